"""Ingestion throughput: media seconds turned into aligned 2-s windows per wall second.

For each resolution, ffmpeg makes an H.264 (30 fps) + AAC (48 kHz stereo) MP4 of a moving test
pattern, then `pipeline.sources.windows.iter_windows` decodes it unpaced into 2-s windows (16 kHz mono
audio, 2 fps RGB frames at full resolution). The figure is the best of --repeat runs; above 1
means one CPU process keeps up with that many live streams of this kind.

    python bench/ingest.py [--seconds 20] [--repeat 3]

Last line: {"640x480": <media s per wall s>, "1920x1080": <media s per wall s>}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.sources.windows import iter_windows  # noqa: E402

SIZES = ("640x480", "1920x1080")


def make_clip(path: Path, size: str, seconds: float) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".part.mp4")
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=f=440:sample_rate=48000:duration={seconds}",
           "-ac", "2", "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "128k", str(tmp)]
    subprocess.run(cmd, check=True, timeout=900)
    os.replace(tmp, path)
    return path


def run_once(path: Path) -> tuple[float, float, int]:
    """(media seconds, wall seconds, windows) for one unpaced pass over the clip."""
    t0 = time.perf_counter()
    n, media = 0, 0.0
    for w in iter_windows(str(path)):
        n += 1
        media = w.end
        assert w.frames.shape[0] == 4 and w.audio.shape == (32000,)
    return media, time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="clip length (media seconds)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per clip; the best counts")
    ap.add_argument("--workdir", default=None, help="where the clips are cached (default: a temp dir)")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="omnizip-ingest-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"clips in {workdir}", flush=True)
    result: dict[str, float] = {}
    for size in SIZES:
        clip = make_clip(workdir / f"clip_{size}_{args.seconds:g}s.mp4", size, args.seconds)
        runs = [run_once(clip) for _ in range(args.repeat)]
        media, wall, n = max(runs, key=lambda r: r[0] / r[1])
        rate = media / wall
        print(f"# {size}: {n} windows, {media:.1f} media s in {wall:.2f} wall s -> "
              f"{rate:.2f} media s per wall s (runs: {', '.join(f'{m / w:.2f}' for m, w, _ in runs)})",
              flush=True)
        result[size] = round(rate, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
