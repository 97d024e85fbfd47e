"""Prefill cost of one 60-s clip: full tokens vs OmniZip's "45%" and "35%" settings, and every
compression method of `omnizip.METHODS` side by side (the baselines at --method-setting).

The clip goes through the stock encoders once (not timed: encoders are the same for every setting);
then, per setting, the compressed prompt (kept tokens at their original positions) is prefilled into
a fresh KV cache and timed: best of --repeats, settings interleaved round-robin after one warm-up
(the minimum damps other processes on a shared CPU; all samples are in the JSON). Peak memory: process RSS
sampled during the prefill on CPU, torch.cuda.max_memory_allocated on GPU.
Last line: {"preset", "settings": {"full"|"45%"|"35%": {"tokens", "prefill_s", "peak_mem_bytes", "speedup"}},
"methods": {"keep_all"|"omnizip"|"random"|"fixed_ratio": {same fields}}, "methods_setting", ...}
("keep_all" is "full", "omnizip" is the --method-setting run: one measurement each, not two).
Presets have random weights: the numbers are about cost, not answers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic_av import synthetic_clip  # noqa: E402

from omnizip import METHODS, PAPER_SETTINGS, make_method  # noqa: E402
from omnizip.models import load_model  # noqa: E402
from omnizip.models.offline import assemble_prompt, compress_encoded_clip  # noqa: E402

QUESTION = "What happens in this clip, and what is said?"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS in a thread while open (CPU peak memory of one call)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def timed_prefill(model, embeds, positions) -> tuple[float, int]:
    """Seconds and peak memory of one prefill (LM over all tokens, KV cache kept, logits of the last)."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model.forward_embeds(embeds, positions, model.new_cache(), "last")
        torch.cuda.synchronize()
        return time.perf_counter() - t0, int(torch.cuda.max_memory_allocated())
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model.forward_embeds(embeds, positions, model.new_cache(), "last")
        dt = time.perf_counter() - t0
    return dt, mem.peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="tiny|small|3b|7b (random weights)")
    ap.add_argument("--model", default=None, help="local Qwen2.5-Omni checkpoint dir (overrides --preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32|bf16|fp16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--frame-size", default="336x336", help="HxW of the synthetic frames")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method-setting", choices=sorted(PAPER_SETTINGS), default="35%",
                    help="the paper setting the baseline methods (random, fixed_ratio) run at")
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.frame_size.lower().split("x"))

    model = load_model(args.model or args.preset, args.device, args.dtype, seed=args.seed)
    audio, frames = synthetic_clip(args.seconds, h, w, args.seed)
    t0 = time.perf_counter()
    encoded = model.encode_clip(audio, frames)
    encode_s = time.perf_counter() - t0

    # One prompt per label: "full" (keep_all), OmniZip at both paper settings, each baseline method.
    label_of = {"keep_all": "full", "omnizip": args.method_setting}
    methods = {"full": make_method("keep_all"), **{s: make_method("omnizip", cfg) for s, cfg in PAPER_SETTINGS.items()}}
    for name in METHODS:
        if name not in label_of:
            label_of[name] = name
            methods[name] = make_method(name, PAPER_SETTINGS[args.method_setting], seed=args.seed)
    configs = list(methods)
    prompts = {label: assemble_prompt(model, compress_encoded_clip(encoded, m), QUESTION) for label, m in methods.items()}
    # warm-up on the smallest prompt (allocator, kernels), then the timed runs, smallest first
    by_size = sorted(configs, key=lambda label: prompts[label].n_tokens)
    timed_prefill(model, prompts[by_size[0]].embeds, prompts[by_size[0]].position_ids)
    results: dict[str, dict] = {}
    runs = [(name, r) for r in range(args.repeats) for name in by_size]
    times: dict[str, list[float]] = {n: [] for n in configs}
    peaks: dict[str, int] = {n: 0 for n in configs}
    for name, _ in tqdm(runs, desc="prefill", file=sys.stderr):
        p = prompts[name]
        dt, peak = timed_prefill(model, p.embeds, p.position_ids)
        times[name].append(dt)
        peaks[name] = max(peaks[name], peak)
    full_s = min(times["full"])
    for name in configs:
        s = min(times[name])
        results[name] = {"tokens": prompts[name].n_tokens, "prefill_s": round(s, 4),
                         "peak_mem_bytes": peaks[name], "speedup": round(full_s / s, 3)}
    out = {
        "preset": args.model or args.preset,
        "settings": {label: results[label] for label in ("full", *PAPER_SETTINGS)},
        "methods": {name: results[label] for name, label in label_of.items()},
        "methods_setting": args.method_setting,
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "clip_s": args.seconds, "frame_hw": [h, w], "encode_s": round(encode_s, 3),
        "retention": {n: round(p.multimodal_kept / p.multimodal_in, 4) for n, p in prompts.items()},
        "mem_reduction": {n: round(peaks["full"] / peaks[n], 3) for n in configs},
        "prefill_samples_s": {n: [round(x, 4) for x in times[n]] for n in configs},
        "median_speedup": {n: round(statistics.median(times["full"]) / statistics.median(times[n]), 3)
                           for n in configs},
        "random_weights": args.model is None,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
