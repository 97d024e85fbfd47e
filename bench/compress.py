"""Times OmniZip's compression at the paper's working shape, side by side with the loop baseline.

A 60-s clip of Qwen2.5-Omni-7B-sized tokens (1500 audio tokens, 60 LLM frames of 128 tokens,
D = 3584): ``compress_clip`` against ``bench/loop_reference.py`` (a plain per-anchor, per-frame,
per-token reading of the spec), checked to agree; then ``StreamCompressor.push`` per 2-s window
(50 audio tokens, 2 frames), early in a stream and after its history is full.
The last line printed is one JSON object.

    python bench/compress.py [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_reference import reference_compress  # noqa: E402

from omnizip import OmniZipConfig, StreamCompressor, compress_clip  # noqa: E402

SECONDS, AUDIO_PER_WINDOW, FRAMES_PER_WINDOW, P, D = 60, 50, 2, 128, 3584


def synthetic_clip(device: str, dtype: torch.dtype, seconds: int = SECONDS, seed: int = 0):
    """Random tokens at the model's shapes (speed does not depend on values)."""
    g = torch.Generator().manual_seed(seed)
    windows = seconds // 2
    audio = torch.randn(windows * AUDIO_PER_WINDOW, D, generator=g)
    scores = torch.rand(windows * AUDIO_PER_WINDOW, generator=g)
    video = torch.randn(windows * FRAMES_PER_WINDOW, P, D, generator=g)
    groups = ([AUDIO_PER_WINDOW] * windows, [FRAMES_PER_WINDOW] * windows)
    return audio.to(device, dtype), scores.to(device, dtype), video.to(device, dtype), *groups


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def time_windows(cfg: OmniZipConfig, device: str, dtype: torch.dtype, windows: int) -> tuple[float, float]:
    """Median seconds per push over the first 20 windows after warm-up, and over the last 20."""
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(AUDIO_PER_WINDOW, D, generator=g).to(device, dtype), torch.rand(AUDIO_PER_WINDOW, generator=g).to(device, dtype),
         torch.randn(FRAMES_PER_WINDOW, P, D, generator=g).to(device, dtype))
        for _ in range(16)
    ]
    sc = StreamCompressor(cfg)
    per_push = []
    for i in tqdm(range(windows), desc="stream windows", leave=False):
        audio, scores, video = data[i % len(data)]
        sync(device)
        start = time.perf_counter()
        sc.push(audio, scores, video)
        sync(device)
        per_push.append(time.perf_counter() - start)
    return statistics.median(per_push[5:25]), statistics.median(per_push[-20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=200, help="windows pushed to time the streaming path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = OmniZipConfig()  # the paper's "35%" setting
    torch.set_grad_enabled(False)

    clip = synthetic_clip(args.device, dtype)
    compress_clip(*clip, cfg)  # warm-up
    clip_s, out = time_call(lambda: compress_clip(*clip, cfg), args.device, args.repeats)
    print(f"compress_clip: {clip_s:.3f} s for a {SECONDS}-s clip ({out.retention:.1%} of tokens kept)", flush=True)

    cpu_clip = [t.cpu() if isinstance(t, torch.Tensor) else t for t in clip]
    baseline_s, ref = time_call(lambda: reference_compress(*cpu_clip, cfg), "cpu", 1)
    keep_a, merged, keep_v, ratios = ref
    agree = (
        torch.equal(out.audio_keep.cpu(), keep_a)
        and torch.equal(out.video_keep.cpu(), keep_v)
        and torch.allclose(out.audio.cpu().float(), merged.float(), atol=1e-4)
        and max(abs(a - b) for a, b in zip(out.video_ratios, ratios)) < 1e-12
    )
    print(f"loop baseline: {baseline_s:.3f} s; outputs agree: {agree}", flush=True)

    # The one large product both implementations must do: each pool token against every video
    # token. Its share bounds any speedup (Amdahl), so it is measured here, in the same run.
    n_pool = int((~out.audio_keep).sum())
    pool = clip[0][:n_pool]
    video_flat = clip[2].reshape(-1, D)
    matmul_s, _ = time_call(lambda: (pool @ video_flat.T).amax(dim=1), args.device, args.repeats)
    print(f"the shared cross-modal product alone ({n_pool} x {video_flat.shape[0]} x {D}): {matmul_s:.3f} s", flush=True)

    window_s, window_late_s = time_windows(cfg, args.device, dtype, args.windows)
    print(f"StreamCompressor.push: {window_s * 1e3:.3f} ms per 2-s window early, {window_late_s * 1e3:.3f} ms "
          f"after {args.windows} windows", flush=True)
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "shape": {"audio_tokens": SECONDS * 25, "frames": SECONDS, "tokens_per_frame": P, "dim": D},
        "clip_s": round(clip_s, 4),
        "baseline_s": round(baseline_s, 4),
        "speedup": round(baseline_s / clip_s, 2),
        "cross_modal_matmul_s": round(matmul_s, 4),
        "speedup_bound": round(baseline_s / matmul_s, 2),
        "speedup_outside_matmul": round((baseline_s - matmul_s) / max(clip_s - matmul_s, 1e-9), 2),
        "agree": agree,
        "window_s": round(window_s, 6),
        "window_late_s": round(window_late_s, 6),
        "window_fraction": round(window_s / 2.0, 6),
    }
    print(json.dumps(result))
    if not agree:
        sys.exit("compress_clip and the loop baseline disagree")


if __name__ == "__main__":
    main()
