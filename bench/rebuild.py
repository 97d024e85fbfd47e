"""A decoder's context rebuild from the store: its peak memory over the steady memory (issue 19).

A stream of --windows synthetic windows at a real-ish size (720p: 2 frame groups of 21 x 36
merged patches + 50 audio tokens, --keep of them kept, random embeddings of the model's width)
is written to a real redis-server as the encoder writes them; then fresh processes (one per
mode) load the model and rebuild a --context-tokens context from Redis:

- ``streamed`` (now: pipeline.engine.rebuild.rebuild_from_store): sizes read first, only the
  newest windows that fit are read again, decoded, prefilled 256 tokens at a time and freed;
- ``all_at_once`` (before issue 19): every stored window read and decoded, then one prefill.

Memory is the process's resident set (glibc told to give large blocks back at once,
MALLOC_MMAP_THRESHOLD_, so freed memory leaves the figures): ``base`` with the model loaded,
``peak`` during the rebuild (VmHWM, reset before), ``steady`` once the context is built.
``peak_over_steady`` is the issue's figure (goal <= 1.3); ``context_peak_over_steady`` the same
above ``base`` (the context's own memory). Last line: the JSON of both modes.

    python bench/rebuild.py [--model small] [--windows 60] [--context-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GRID_720P = (21, 36)  # 720p scaled into Qwen's 768 x 28 x 28 pixels per frame: 756 merged patches


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss() -> int:
    """Resident bytes of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    """Start VmHWM (peak resident) again from now (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> int:
    return _status_kib("VmHWM") * 1024


def synthetic_windows(model, n: int, keep: float, grid: tuple[int, int] = GRID_720P, seed: int = 0):
    """``n`` compressed windows with real positions and ``keep`` of their tokens (random embeddings)."""
    import torch

    from omnizip.models.positions import window_position_ids
    from omnizip.models.window import EncodedWindow, compress_encoded

    g = torch.Generator().manual_seed(seed)
    d, p, offset = model.hidden_size, grid[0] * grid[1], model.mm_offset(None)
    for i in range(n):
        enc = EncodedWindow(i, torch.randn(50, d, generator=g), torch.rand(50, generator=g),
                            torch.randn(2, p, d, generator=g), window_position_ids(i, grid, 2, 50, offset),
                            offset, grid)
        yield compress_encoded(enc, torch.rand(50, generator=g) < keep, None,
                               torch.rand(2, p, generator=g) < keep)


def fill_store(store, sid: str, model, n: int, keep: float) -> int:
    """Write ``n`` windows of stream ``sid`` as the encoder does; the tokens written."""
    tokens = 0
    for cw in synthetic_windows(model, n, keep):
        store.append_window(sid, cw.index, cw.to_bytes(), media_start=2.0 * cw.index, media_end=2.0 * cw.index + 2,
                            fields={"audio_kept": cw.audio_kept, "video_kept": cw.video_kept})
        tokens += cw.n_tokens
    return tokens


def measure(mode: str, model_name: str, redis_url: str, sid: str, context_tokens: int) -> dict:
    """Rebuild ``sid``'s context from Redis in this process; its memory figures."""
    import torch

    from omnizip.models import CompressedWindow, load_model
    from omnizip.models.rolling import RollingContext
    from pipeline.engine.rebuild import rebuild_from_store
    from pipeline.store.redis_store import RedisStore

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = load_model(model_name, "cpu")
    store = RedisStore(redis_url)
    ctx = RollingContext(model, budget_tokens=context_tokens)
    base = rss()
    reset_peak()
    t = time.perf_counter()
    if mode == "streamed":
        rebuild_from_store(ctx, store, sid)
    else:  # the decoder before issue 19: everything read and decoded, one prefill of what fits
        stored = store.windows(sid)
        ws = [CompressedWindow.from_bytes(w.payload) for w in stored]
        skip = ctx.rebuild_skip([(w.index, w.n_tokens) for w in ws])
        ctx._prefill([w.rebased(ctx.offset) for w in ws[skip:]])
        del stored, ws
    seconds = time.perf_counter() - t
    top, steady = peak(), rss()
    return {"mode": mode, "base_mb": round(base / 2**20, 1), "peak_mb": round(top / 2**20, 1),
            "steady_mb": round(steady / 2**20, 1), "peak_over_steady": round(top / steady, 3),
            "context_peak_over_steady": round((top - base) / max(1, steady - base), 3),
            "context_tokens": ctx.n_tokens, "windows": len(ctx.spans), "rebuild_s": round(seconds, 2)}


def run_child(mode: str, model_name: str, redis_url: str, sid: str, context_tokens: int) -> dict:
    """``measure`` in a fresh process (its memory is the rebuild's alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", model_name, "--redis-url", redis_url,
                          "--sid", sid, "--context-tokens", str(context_tokens)],
                         env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="preset (tiny, small, 3b, 7b) or checkpoint dir")
    ap.add_argument("--windows", type=int, default=60, help="windows stored (the newest that fit are rebuilt)")
    ap.add_argument("--context-tokens", type=int, default=16384)
    ap.add_argument("--keep", type=float, default=0.35, help="share of each window's tokens kept")
    ap.add_argument("--modes", default="streamed,all_at_once")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sid", default="bench", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = measure(args.child, args.model, args.redis_url, args.sid, args.context_tokens)
        print(json.dumps(res))
        return res

    from redis_helpers import RedisServer

    from omnizip.models import load_model
    from pipeline.store.redis_store import RedisStore

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            store = RedisStore(server.url)
            store.create_stream({"source": "bench"}, args.sid)
            tokens = fill_store(store, args.sid, load_model(args.model, "cpu"), args.windows, args.keep)
            print(f"stored {args.windows} windows, {tokens} tokens", file=sys.stderr)
            res = {"model": args.model, "windows": args.windows, "stored_tokens": tokens,
                   "context_budget": args.context_tokens}
            for mode in args.modes.split(","):
                res[mode] = run_child(mode, args.model, server.url, args.sid, args.context_tokens)
                print(json.dumps(res[mode]), file=sys.stderr)
        finally:
            server.stop()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
