"""What watches cost the decoder (issue 22), on a random-weight preset (`small` by default):

1. a window's decoder time with 0, 4 and 16 yes_no watches due: the window's incremental prefill
   plus the watches' one packed probe forward (omnizip.models.probe), and each watch's share of
   the window's prefill (goal <= 10 % per watch);
2. one yes_no evaluation after 1 and after 20 minutes of stream (30 and 600 windows appended to
   a rolling context of the engine's default budget; goal flat, <= 1.2x);
3. 16 streams' due watches as one packed forward against one probe per stream and against the
   stock path per stream (prefill the question into the cache, full LM head, crop back)
   (goal >= 2x).

    python bench/watches.py [--model small] [--threads 1] [--reps 5]

Median of --reps runs each. Last line: one JSON object with every figure (ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from omnizip import OmniZipConfig, StreamCompressor  # noqa: E402
from omnizip.models import load_model  # noqa: E402
from omnizip.models.probe import NO_WORDS, YES_WORDS, answer_token_ids, probe_last_logits  # noqa: E402
from omnizip.models.rolling import RollingContext  # noqa: E402
from omnizip.models.window import compress_with  # noqa: E402

QUESTION = "Is someone at the door? Answer yes or no."


def windows(model, n: int, seed: int, start: int = 0):
    """``n`` encoded and compressed 2-s windows (random audio and 112x112 frames), indices from start."""
    rng = np.random.default_rng(seed)
    sc = StreamCompressor(OmniZipConfig(rho_audio=0.4, rho_video=0.7), lookahead=0)
    for k in range(start, start + n):
        enc = model.encode_window((0.1 * rng.standard_normal(32000)).astype(np.float32),
                                  rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8), k)
        (done,) = sc.push(enc.audio, enc.audio_scores, enc.video)
        yield compress_with(enc, done)


def median_ms(fn, reps: int) -> float:
    fn()  # warm
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(out), 2)


def probe(model, ctxs, rows):
    pieces = [model.prompt_suffix(QUESTION, c.next_position) for c in ctxs]
    return probe_last_logits(model, [c.cache for c in ctxs], pieces, rows)


def stock(model, ctx, rows):
    p = model.prompt_suffix(QUESTION, ctx.next_position)
    n = ctx.n_tokens
    out = model.forward_embeds(model.embed_ids(p.ids), p.position_ids, ctx.cache, "last")[0, rows]
    ctx.cache.crop(n - ctx.cache.get_seq_length())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=int, default=8192, help="context tokens (the engine's default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    rows = torch.tensor(answer_token_ids(model.processor, YES_WORDS) + answer_token_ids(model.processor, NO_WORDS))
    out: dict = {"model": a.model, "threads": a.threads, "reps": a.reps, "budget_tokens": a.budget}

    # 1. a window's decoder time with 0 / 4 / 16 watches due (one stream, one packed forward)
    ctx = RollingContext(model, a.budget)
    pool = list(windows(model, 30 + 3 * (a.reps + 1) * 3, seed=1))
    for w in pool[:30]:
        ctx.append(w)
    feed = iter(pool[30:])
    out["window_tokens"] = round(statistics.mean(w.n_tokens for w in pool), 1)
    per_window = {}
    for k in (0, 4, 16):
        def step() -> None:
            ctx.append(next(feed))
            if k:
                probe(model, [ctx] * k, rows)
        per_window[k] = median_ms(step, a.reps)
    prefill = per_window[0]
    out["window_ms"] = {str(k): v for k, v in per_window.items()}
    out["share_per_watch"] = {str(k): round((per_window[k] - prefill) / prefill / k, 3) for k in (4, 16)}

    # 2. one evaluation at 1 and at 20 minutes of stream
    one = RollingContext(model, a.budget)
    for w in windows(model, 30, seed=2):
        one.append(w)
    twenty = RollingContext(model, a.budget)
    for w in windows(model, 600, seed=3):
        twenty.append(w)
    e1, e20 = median_ms(lambda: probe(model, [one], rows), a.reps), median_ms(lambda: probe(model, [twenty], rows),
                                                                              a.reps)
    out["evaluation_ms"] = {"1min": e1, "20min": e20, "ratio": round(e20 / e1, 3),
                            "context_tokens": {"1min": one.n_tokens, "20min": twenty.n_tokens},
                            "evicted_windows_20min": twenty.evicted_windows}

    # 3. 16 streams batched against one by one
    ctxs = []
    for s in range(16):
        c = RollingContext(model, a.budget)
        for w in windows(model, 10, seed=10 + s):
            c.append(w)
        ctxs.append(c)
    batched = median_ms(lambda: probe(model, ctxs, rows), a.reps)
    alone = median_ms(lambda: [probe(model, [c], rows) for c in ctxs], a.reps)
    stocked = median_ms(lambda: [stock(model, c, rows) for c in ctxs], a.reps)
    out["streams16_ms"] = {"batched": batched, "one_by_one": alone, "one_by_one_stock": stocked,
                           "speedup": round(alone / batched, 2), "speedup_vs_stock": round(stocked / batched, 2),
                           "context_tokens": ctxs[0].n_tokens}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
