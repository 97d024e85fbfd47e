"""``omnizip-stream run`` / ``demo`` once Ray is up: create the stream, follow it to its end (or
for ``--duration``), ask, print. Human text goes to ``out`` (stderr under ``--json``, so stdout
carries exactly one JSON object); the progress bar always goes to stderr."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

__all__ = ["run_stream", "window_line", "summary"]


def _duration_windows(source: str) -> int | None:
    """Windows in a file (for the progress bar); None for live sources or when unknown."""
    import av

    from pipeline.sources.spec import classify

    spec = classify(source)
    if spec.kind != "file":
        return None
    try:
        with av.open(spec.target) as c:
            return int(-(-c.duration // (2 * av.time_base))) if c.duration else None
    except Exception:
        return None


def _answer(svc: Any, sid: str, question: str, max_tokens: int, out: TextIO) -> tuple[str, float, int]:
    import ray

    t = time.perf_counter()
    ttft, parts = None, []
    for ref in svc.ask.options(num_returns="streaming").remote(sid, question, max_tokens):
        piece = ray.get(ref)
        if ttft is None:
            ttft = time.perf_counter() - t
        parts.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(parts), ttft or 0.0, len(parts)


def window_line(w: dict) -> str:
    a_in, a_k, v_in, v_k = (int(w.get(k, 0)) for k in ("audio_in", "audio_kept", "video_in", "video_kept"))
    ratio = (a_k + v_k) / max(1, a_in + v_in)
    extra = "  (compressed harder)" if w.get("harder") else ""
    return (f"window {w['index']:3d} [{w['start']:6.1f}-{w['end']:6.1f} s]  audio {a_k:3d}/{a_in:3d}  "
            f"video {v_k:4d}/{v_in:4d}  kept {ratio:6.1%}{extra}")


def summary(st: dict) -> str:
    t = st["tokens"]
    tin = t["audio"]["in"] + t["video"]["in"]
    kept = t["audio"]["kept"] + t["video"]["kept"]
    return (f"stream {st['id']} ({st['status']}): {st['windows_total']} windows, {st['windows']} in context, "
            f"{st['dropped']} dropped; audio kept {t['audio']['kept']}/{t['audio']['in']}, video kept "
            f"{t['video']['kept']}/{t['video']['in']} ({kept / max(1, tin):.1%} of tokens); "
            f"context {st['context_tokens']} tokens; lag {st['lag_s']:.2f} s")


def run_stream(cfg: Any, spec: dict, question: str, max_tokens: int, *, per_window: bool, progress: bool,
               duration_s: float | None, as_json: bool, out: TextIO | None = None,
               json_out: TextIO | None = None) -> int:
    """Create the stream, follow it to its end (or for duration_s), ask, print; 0 on success,
    1 when the stream failed (one line on stderr). ``as_json``: one JSON object to ``json_out``
    (stdout by default), the human text to stderr."""
    import ray

    from pipeline.engine.service import get_or_create_service, shutdown_service

    out = out or (sys.stderr if as_json else sys.stdout)
    svc = get_or_create_service(cfg)
    try:
        st = ray.get(svc.create_stream.remote(spec))
        sid = st["id"]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=_duration_windows(spec["source"]), unit="window", desc="windows", file=sys.stderr)
        shown, t_start, per = 0, time.monotonic(), []
        while True:
            st = ray.get(svc.get_stream.remote(sid))
            if per_window:
                for w in ray.get(svc.windows.remote(sid, shown)):
                    print(window_line(w), file=out, flush=True)
                    per.append(w)
                    shown = w["index"] + 1
            if bar is not None:
                bar.n = st["windows_total"]
                bar.set_postfix(in_context=st["windows"], dropped=st["dropped"], refresh=False)
                bar.refresh()
            if st["status"] in ("ended", "failed"):
                break
            if duration_s is not None and time.monotonic() - t_start > duration_s:
                break
            time.sleep(0.25)
        if bar is not None:
            bar.close()
        if st["status"] == "failed":
            print(f"omnizip-stream: the stream failed: {' '.join(str(st['error']).split())}", file=sys.stderr)
            return 1
        print(f"Q: {question}\nA: ", end="", file=out, flush=True)
        text, ttft, n = _answer(svc, sid, question, max_tokens, out)
        st = ray.get(svc.get_stream.remote(sid))
        print(summary(st), file=out)
        print(f"answer: {n} tokens, first after {ttft * 1000:.0f} ms", file=out)
        if as_json:
            doc = {**st, "question": question, "answer": text, "ttft_s": ttft}
            if per_window:
                doc["per_window"] = per
            print(json.dumps(doc), file=json_out or sys.stdout, flush=True)
        return 0
    finally:
        shutdown_service(svc)
