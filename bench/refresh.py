"""Residue of evicted windows in a rolling context, and what a periodic refresh costs.

A stream of --windows compressed windows (a short synthetic clip encoded once, recycled at later
indices as in ttft.py) is appended to a RollingContext with a small --budget, so windows are evicted
all along. After every --measure-every appends, the context is compared with a fresh prefill of the
same held windows at the same (renumbered) positions:
- window_dev: max |logit| difference over the tokens of the window just appended (incremental vs fresh);
- question_dev: max |logit| difference of the next token after a question.
That difference is the residue: held windows were computed while now-evicted windows were in the cache
(plus re-rotation rounding). Each --refresh-every setting ("none" = never) runs the same stream; a
refresh re-prefills the held windows. Timing: median append and median refresh (best-effort on a
shared CPU). Last line: {"preset", "evicted", "series": {setting: {...}}, "append_s", "refresh_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttft import compressed_stream  # noqa: E402

from omnizip import PAPER_SETTINGS  # noqa: E402
from omnizip.models import load_model  # noqa: E402
from omnizip.models.rolling import RollingContext  # noqa: E402

QUESTION = "What has happened on the stream so far?"
NEVER = 10 ** 9  # keeps the held windows (to compare) but never refreshes


def fresh_logits(model, ctx: RollingContext, last_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh prefill of prefix + held windows at the context's positions: logits of the last window's
    tokens, and the question's next-token logits."""
    pre = model.prompt_prefix()
    emb = torch.cat([model.embed_ids(pre.ids)] + [w.embeds.to(model.device, model.dtype) for w in ctx._windows])
    cache = model.new_cache()
    logits = model.forward_embeds(emb, ctx.position_ids(), cache, "all")[-last_tokens:] if last_tokens else None
    q = model.prompt_suffix(QUESTION, ctx.next_position)
    return logits, model.forward_embeds(model.embed_ids(q.ids), q.position_ids, cache, "last")[0]


def question_logits(model, ctx: RollingContext) -> torch.Tensor:
    q = model.prompt_suffix(QUESTION, ctx.next_position)
    n = ctx.n_tokens
    try:
        return model.forward_embeds(model.embed_ids(q.ids), q.position_ids, ctx.cache, "last")[0]
    finally:
        ctx.cache.crop(n - ctx.cache.get_seq_length())


def run(model, windows, budget: int, every: int | None, measure_every: int) -> dict:
    """One stream; refreshes as `refresh_every=every` would do them, but called here so they are timed alone."""
    ctx = RollingContext(model, budget_tokens=budget, refresh_every=NEVER)
    out: dict[str, list] = {"window": [], "evicted": [], "window_dev": [], "question_dev": []}
    append_s, refresh_s = [], []
    evicted_at_refresh = 0
    for k, w in enumerate(windows):
        t0 = time.perf_counter()
        logits = ctx.append(w, return_logits=True)
        append_s.append(time.perf_counter() - t0)
        if k % measure_every == 0:
            ref_w, ref_q = fresh_logits(model, ctx, w.n_tokens)
            out["window"].append(w.index)
            out["evicted"].append(ctx.evicted_windows)
            out["window_dev"].append(round(float((logits - ref_w).abs().max()), 7) if w.n_tokens else 0.0)
            out["question_dev"].append(round(float((question_logits(model, ctx) - ref_q).abs().max()), 7))
        if every and (k + 1) % every == 0 and ctx.evicted_windows > evicted_at_refresh:
            t0 = time.perf_counter()
            ctx.refresh()
            refresh_s.append(time.perf_counter() - t0)
            evicted_at_refresh = ctx.evicted_windows
    out["refreshes"] = ctx.refreshes
    out["max_window_dev"] = max(out["window_dev"], default=0.0)
    out["max_question_dev"] = max(out["question_dev"], default=0.0)
    out["append_s"] = round(statistics.median(append_s), 5)
    out["refresh_s"] = round(statistics.median(refresh_s), 5) if refresh_s else None
    out["held_windows"] = len(ctx.window_indices)
    out["context_tokens"] = ctx.n_tokens
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", default=None, help="local Qwen2.5-Omni checkpoint dir (overrides --preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--windows", type=int, default=120)
    ap.add_argument("--budget", type=int, default=1200, help="rolling context budget in tokens")
    ap.add_argument("--refresh-every", nargs="+", default=["none", "30", "10"])
    ap.add_argument("--measure-every", type=int, default=1)
    ap.add_argument("--setting", default="35%", choices=sorted(PAPER_SETTINGS))
    ap.add_argument("--frame-size", default="112x112")
    ap.add_argument("--distinct", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.frame_size.lower().split("x"))

    model = load_model(args.model or args.preset, args.device, args.dtype, seed=args.seed)
    _, windows = compressed_stream(model, args.windows, h, w, args.distinct, args.seed, args.setting)
    series = {}
    for setting in args.refresh_every:
        every = None if setting == "none" else int(setting)
        series[setting] = run(model, windows, args.budget, every, args.measure_every)
    probe = RollingContext(model, budget_tokens=args.budget)
    for win in windows[:5]:
        probe.append(win)
    scale = float(question_logits(model, probe).abs().max())
    base_s = series.get("none", next(iter(series.values())))["append_s"]
    out = {"preset": args.model or args.preset, "device": str(model.device),
           "dtype": str(model.dtype).replace("torch.", ""), "windows": args.windows, "budget_tokens": args.budget,
           "logit_scale": round(scale, 4), "series": series, "append_s": base_s,
           "refresh_s": next((s["refresh_s"] for s in series.values() if s["refresh_s"]), None),
           "random_weights": args.model is None}
    out["refresh_over_append"] = round(out["refresh_s"] / base_s, 2) if out["refresh_s"] else None
    out["amortised_per_window_s"] = {k: round(s["refresh_s"] / int(k), 5) for k, s in series.items()
                                     if s["refresh_s"] and k != "none"}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
