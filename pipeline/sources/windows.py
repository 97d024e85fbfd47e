"""Cut any source into aligned audio-video windows on one media timeline.

Timeline: media time 0 is the earliest timestamp of the source (minimum over its tracks);
window k covers [k * window_s, (k + 1) * window_s). Every window has exactly
window_s * sample_rate audio samples and window_s * fps frames, whatever the source does:

* audio is placed by its timestamps; a hole is filled with silence and flagged (`audio_gap`,
  `audio_filled_s`), overlapping samples are dropped, jitter under `audio_tolerance_s` is
  absorbed without a flag;
* frame i of window k is sampled at `frame_times[i] = start + i / fps` and is the frame on
  screen at that instant: the latest frame whose timestamp is <= the sample time (`frame_pts`
  holds its timestamp). A sample instant inside an interval between two frames longer than
  `video_gap_s` (or past the last frame, or before the first) holds the nearest frame and is
  flagged (`video_gap`, `video_filled`);
* a clock jump (a backward step, or a forward step beyond `max_gap_s` in a file that lands past
  the container's declared end) is rebased so media time continues, and flagged
  (`discontinuity`); in a live source a jump is rebased by wall-clock time, so a real outage
  becomes a flagged gap. In a file, a forward step that stays inside the container's duration
  is media lost to damage: a flagged hole, the timeline kept (as ffmpeg plays it);
* in a file, an event off its track's line (more than `jump_back_s` either way) is held until
  the next event of that track: if that one goes on from the old line, the held one was a stray
  (a damaged decoder's misplaced frame) and is dropped; else it starts the new line;
* decoding errors the source skipped are counted in the window being assembled when they
  happened (`decode_errors`, `damaged`);
* after a reconnect the new session is placed at the media time reached before the outage
  plus the wall-clock outage, so the timeline continues and the outage is a flagged gap;
* a missing track gives silence / no frames with `has_audio` / `has_video` False;
* the source ending inside a window pads it (flagged fill) and marks it `final`.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np

from pipeline.sources.policy import SourcePolicy
from pipeline.sources.events import AudioChunk, Reconnected, VideoChunk
from pipeline.sources.source import Source
from pipeline.sources.spec import SourceOptions
from pipeline.sources.tracks import AudioLine, Held
from pipeline.errors import SourceError

if TYPE_CHECKING:
    from pipeline.sources.push import PushSource

_EPS = 1e-4  # seconds: timestamp rounding slack when comparing a frame time to a sample time


@dataclass
class AVWindow:
    """One aligned window, ready for the encoders. Plain data: picklable across Ray."""

    index: int
    start: float  # media seconds
    end: float
    audio: np.ndarray  # float32 [window_s * sample_rate], mono
    frames: np.ndarray  # uint8 [window_s * fps, H, W, 3] RGB; H = W = 0 without video (no size)
    frame_times: np.ndarray  # float64 [window_s * fps]: sample instants start + i / fps
    frame_pts: np.ndarray  # float64: media time of the frame shown at each instant (nan: none)
    has_audio: bool
    has_video: bool
    audio_gap: bool = False  # some audio of this window is filled silence (a hole, not jitter)
    video_gap: bool = False  # some frames of this window are held over a hole
    audio_filled_s: float = 0.0  # seconds of flagged silence in this window
    video_filled: int = 0  # frames held over a hole
    discontinuity: bool = False  # the source clock jumped inside this window (rebased)
    reconnects: int = 0  # reconnects of the source so far
    final: bool = False  # the source ended inside this window; the rest is padding
    decode_errors: int = 0  # packets the source could not decode (skipped) while this window was read
    sample_rate: int = 16000
    fps: float = 2.0

    @property
    def gap(self) -> bool:
        return self.audio_gap or self.video_gap

    @property
    def damaged(self) -> bool:
        """Corrupt data was skipped here: what the window holds is what could be decoded."""
        return self.decode_errors > 0


class WindowAssembler:
    """Turns source events into AVWindows. One per stream; not thread-safe."""

    def __init__(self, *, window_s: float, fps: float, sample_rate: int, has_audio: bool,
                 has_video: bool, live: bool, options: SourceOptions,
                 size: tuple[int, int] | None = None, video_size: tuple[int, int] | None = None,
                 frame_duration: float | None = None, start_time: float | None = None,
                 realtime: bool = False, unpaced_until_s: float = 0.0,
                 declared_end: float | None = None) -> None:
        self.window_s, self.fps, self.sr = float(window_s), float(fps), int(sample_rate)
        self.n_samples = _whole(window_s * sample_rate, "window_s * sample_rate")
        self.n_frames = _whole(window_s * fps, "window_s * fps")
        self.has_audio, self.has_video, self.live = has_audio, has_video, live
        self.o = options
        self.size = size
        self.video_size = video_size
        self.frame_dur = frame_duration or 1.0 / self.fps
        self.start_time = start_time
        self.declared_end = None if live else declared_end  # source time a file's container ends at
        self.realtime = realtime
        self.unpaced_until_s = float(unpaced_until_s)  # a resumed file fast-forwards to here unpaced
        self.index = 0  # next window to emit
        self.reconnects = 0
        self.discontinuities = 0
        self.dropped_frames = 0  # out-of-order / duplicate frames
        # clock
        self._origin: float | None = None
        self._offset = {"audio": 0.0, "video": 0.0}
        self._last_raw: dict[str, tuple[float, float] | None] = {"audio": None, "video": None}
        self._last_wall: dict[str, float | None] = {"audio": None, "video": None}
        self._jumps: list[tuple[float, float]] = []  # (raw delta, offset shift) per clock jump
        self._jumps_seen = {"audio": 0, "video": 0}
        self._disc_windows: set[int] = set()
        self._rebase: tuple[float, float] | None = None  # (media reached, wall time) at loss
        self._wall0: float | None = None
        self._last_event_wall = 0.0
        self._held_ev: dict[str, AudioChunk | VideoChunk] = {}  # files: an off-line event awaiting the next
        self._errors_seen = 0
        self._err_windows: dict[int, int] = {}  # window index -> decode errors counted while reading it
        # tracks
        self._audio = AudioLine(int(round(options.audio_tolerance_s * self.sr)))
        self._v_last: Held | None = None
        self._v_next = 0  # absolute index of the next unresolved sample instant
        self._v_done: deque[tuple[Held, bool]] = deque()  # resolved instants, not yet emitted
        self._v_end = -math.inf  # media time of the latest frame

    # -- public ----------------------------------------------------------------------------
    def push(self, ev: object) -> Iterator[AVWindow]:
        """Feed one source event; yields the windows it completes."""
        if isinstance(ev, Reconnected):
            self.reconnects = ev.count
            self._rebase = (self._progress(), self._last_event_wall)
            return
        if self.live or not isinstance(ev, (AudioChunk, VideoChunk)):
            yield from self._take(ev)
            return
        kind = "audio" if isinstance(ev, AudioChunk) else "video"
        held = self._held_ev.pop(kind, None)
        if held is not None:
            if self._stray(kind, held, ev):
                self._drop_stray(held)
            else:
                yield from self._take(held)
        elif self._off_line(kind, ev.t):
            self._held_ev[kind] = ev
            return
        yield from self._take(ev)

    def note_errors(self, total: int) -> None:
        """The source's count of skipped decoding errors so far: new ones belong to the window
        being read now (the earliest track's position)."""
        new, self._errors_seen = total - self._errors_seen, max(total, self._errors_seen)
        if new > 0:
            ends = []
            if self.has_audio and self._audio.started:
                ends.append(self._audio.end / self.sr)
            if self.has_video and self._v_last is not None:
                ends.append(self._v_end)
            k = max(self.index, int(min(ends) // self.window_s) if ends else 0)
            self._err_windows[k] = self._err_windows.get(k, 0) + new

    def _take(self, ev: object) -> Iterator[AVWindow]:
        now = time.monotonic()
        if isinstance(ev, AudioChunk):
            if not self.has_audio:
                return
            t = self._media_time("audio", ev.t, len(ev.samples) / self.sr, now)
            self._pace(t, now)
            self._audio.write(None if t is None else int(round(t * self.sr)), ev.samples)
        elif isinstance(ev, VideoChunk):
            if not self.has_video:
                return
            t = self._media_time("video", ev.t, self.frame_dur, now)
            if t is None:
                if self._v_last is None:
                    self.dropped_frames += 1
                    return
                t = self._v_last.t + self.frame_dur
            self._pace(t, now)
            self._video(t, ev.frame)
        else:
            raise TypeError(f"unknown source event {type(ev).__name__}")
        self._last_event_wall = time.monotonic()
        self._skew()
        while self._ready():
            yield self._emit()

    def finish(self) -> Iterator[AVWindow]:
        """The source ended: pad and emit what is left (the last window marked final)."""
        for kind in ("audio", "video"):  # an event held at the very end: nothing refutes it
            if kind in self._held_ev:
                yield from self._take(self._held_ev.pop(kind))
        end = self._progress()
        if end == -math.inf:
            return
        total = math.ceil((end - self.o.min_tail_s) / self.window_s - 1e-9)
        while self.index < total:
            self._fill_to((self.index + 1) * self.window_s)
            w = self._emit()
            w.final = self.index == total
            yield w

    # -- timing ----------------------------------------------------------------------------
    def _media_time(self, kind: str, raw: float | None, dur: float, now: float) -> float | None:
        if raw is None:
            return None
        if self._origin is None:
            st = self.start_time
            self._origin = st if st is not None and abs(raw - st) < self.o.max_gap_s else raw
            self._offset = {k: -self._origin for k in self._offset}
        if self._rebase is not None:  # first event of a new session after a reconnect
            reached, lost_wall = self._rebase
            self._rebase = None
            target = (0.0 if reached == -math.inf else reached) + max(0.0, now - lost_wall)
            self._offset = {k: target - raw for k in self._offset}
            self._last_raw = {k: None for k in self._last_raw}
            self._jumps_seen = {k: len(self._jumps) for k in self._jumps_seen}
        last = self._last_raw[kind]
        if last is not None:
            if raw < last[0] - self.o.jump_back_s or (raw > last[1] + self.o.max_gap_s and not self._inside(raw)):
                self._jump(kind, raw, raw - last[1], now)
                last = None
        # an out-of-order packet must not pull the expected time back
        self._last_raw[kind] = (raw, raw + dur) if last is None else (max(last[0], raw), max(last[1], raw + dur))
        self._last_wall[kind] = now
        return raw + self._offset[kind]

    def _inside(self, raw: float) -> bool:
        """A file's timestamp within its container's declared duration: a forward step to it
        skipped damaged media, it is no clock jump."""
        return self.declared_end is not None and raw <= self.declared_end + 1.0

    def _off_line(self, kind: str, raw: float | None) -> bool:
        """More than jump_back_s before or after where the track's last event ended."""
        last = self._last_raw[kind]
        return (raw is not None and last is not None
                and (raw < last[0] - self.o.jump_back_s or raw > last[1] + self.o.jump_back_s))

    def _stray(self, kind: str, held: AudioChunk | VideoChunk, ev: AudioChunk | VideoChunk) -> bool:
        """`ev` goes on from the old line rather than from `held`: `held` was misplaced."""
        last = self._last_raw[kind]
        if ev.t is None or last is None or held.t is None:
            return False
        return abs(ev.t - last[1]) < abs(ev.t - held.t)

    def _drop_stray(self, held: AudioChunk | VideoChunk) -> None:
        if isinstance(held, VideoChunk):
            self.dropped_frames += 1
        else:
            self._audio.dropped += len(held.samples)

    def _jump(self, kind: str, raw: float, d: float, now: float) -> None:
        """Rebase a clock jump; the other track reuses the same shift when it jumps alike."""
        seen = self._jumps_seen[kind]
        for i, (jd, shift) in enumerate(self._jumps[seen:]):
            if abs(jd - d) < 1.0:
                self._offset[kind] += shift
                self._jumps_seen[kind] = seen + i + 1
                return
        expected = self._last_raw[kind][1] + self._offset[kind]  # media time the track had reached
        if self.live:  # trust the wall clock: a real outage stays a (flagged) gap
            expected += max(0.0, now - (self._last_wall[kind] or now))
        shift = expected - (raw + self._offset[kind])
        self._offset[kind] += shift
        self._jumps.append((d, shift))
        self._jumps_seen[kind] = len(self._jumps)
        self.discontinuities += 1
        self._disc_windows.add(max(0, int(expected // self.window_s)))

    def _pace(self, t: float | None, now: float) -> None:
        if not self.realtime or t is None or t < self.unpaced_until_s:
            return
        if self._wall0 is None:
            self._wall0 = now - t
        delay = self._wall0 + t - now
        if delay > 0:
            time.sleep(delay)

    def _progress(self) -> float:
        """Media time up to which the source has delivered something."""
        ends = []
        if self.has_audio and self._audio.started:
            ends.append(self._audio.end / self.sr)
        if self.has_video and self._v_last is not None:
            ends.append(self._v_end + self.frame_dur)
        return max(ends) if ends else -math.inf

    # -- video -----------------------------------------------------------------------------
    def _video(self, t: float, frame: av.VideoFrame) -> None:
        last = self._v_last
        if last is not None and t < last.t - _EPS:  # out of order after decoding: too late
            self.dropped_frames += 1
            return
        h = Held(t, frame)
        while self._v_next / self.fps + _EPS < t:  # instants before this frame are settled
            s = self._v_next / self.fps
            if last is None:  # before the first frame: show it early, flagged unless just early
                self._v_done.append((h, t - s > min(self.o.video_gap_s, 0.1)))
            else:
                self._v_done.append((last, t - last.t > self.o.video_gap_s))
            self._v_next += 1
        self._v_last = h
        self._v_end = t

    def _fill_video_to(self, t: float) -> None:
        """Settle instants before t with the last frame held (the track stalled or ended)."""
        while self._v_next / self.fps + _EPS < t:
            s = self._v_next / self.fps
            held = self._v_last
            if held is None:
                self._v_done.append((Held(math.nan, None), True))
            else:
                self._v_done.append((held, s - held.t > self.o.video_gap_s))
            self._v_next += 1

    # -- windows ---------------------------------------------------------------------------
    def _fill_to(self, t: float) -> None:
        if self.has_audio:
            self._audio.fill_to(int(round(t * self.sr)))
        if self.has_video:
            self._fill_video_to(t)

    def _skew(self) -> None:
        if not (self.has_audio and self.has_video):
            return
        a = self._audio.end / self.sr if self._audio.started else 0.0
        v = self._v_end if self._v_last is not None else 0.0
        if v - a > self.o.max_skew_s:
            self._audio.fill_to(int(round((v - self.o.max_skew_s) * self.sr)))
        elif a - v > self.o.max_skew_s:
            self._fill_video_to(a - self.o.max_skew_s)

    def _ready(self) -> bool:
        k1 = self.index + 1
        return ((not self.has_audio or self._audio.end >= k1 * self.n_samples)
                and (not self.has_video or self._v_next >= k1 * self.n_frames))

    def _frame_hw(self) -> tuple[int, int]:
        if self.size is None:
            if self._v_last is not None and self._v_last.frame is not None:
                self.size = (self._v_last.frame.height, self._v_last.frame.width)
            elif self._v_done and self._v_done[0][0].frame is not None:
                f = self._v_done[0][0].frame
                self.size = (f.height, f.width)
            else:
                self.size = self.video_size or (0, 0)
        return self.size

    def _emit(self) -> AVWindow:
        k, F = self.index, self.n_frames
        start = k * self.window_s
        if self.has_audio:
            audio, filled = self._audio.take(self.n_samples)
        else:
            audio, filled = np.zeros(self.n_samples, np.float32), 0
        times = (k * F + np.arange(F)) / self.fps
        if self.has_video:
            hw = self._frame_hw()
            held = [self._v_done.popleft() for _ in range(F)]
            frames = np.stack([h.array(hw) for h, _ in held])
            pts = np.array([h.t for h, _ in held], np.float64)
            vfilled = sum(flag for _, flag in held)
        else:
            h, w = self.size or (0, 0)
            frames = np.zeros((F, h, w, 3), np.uint8)
            pts = np.full(F, np.nan)
            vfilled = 0
        self.index += 1
        return AVWindow(
            index=k, start=start, end=start + self.window_s, audio=audio, frames=frames,
            frame_times=times, frame_pts=pts, has_audio=self.has_audio, has_video=self.has_video,
            audio_gap=filled > 0, video_gap=vfilled > 0, audio_filled_s=filled / self.sr,
            video_filled=int(vfilled), discontinuity=k in self._disc_windows,
            reconnects=self.reconnects, sample_rate=self.sr, fps=self.fps,
            decode_errors=self._err_windows.pop(k, 0))


def _whole(x: float, what: str) -> int:
    n = int(round(x))
    if n <= 0 or abs(x - n) > 1e-6:
        raise ValueError(f"{what} must be a positive whole number, got {x:g}")
    return n


def iter_windows(source: "str | os.PathLike | Source | PushSource", *, window_s: float = 2.0, fps: float = 2.0,
                 sample_rate: int = 16000, realtime: bool | None = None,
                 options: SourceOptions | Mapping | None = None,
                 size: tuple[int, int] | None = None,
                 policy: SourcePolicy | None = None, skip_windows: int = 0) -> Iterator[AVWindow]:
    """Yield aligned AVWindows from a URL, path, `lavfi:` graph, device, an opened Source or a
    PushSource (pipeline.sources.push: media a publisher sends).

    realtime: None paces nothing (live sources arrive at their own pace), True paces a file at
    real time so it behaves like a live source. size: (H, W) to scale frames to (else the
    source's size). policy: the SourcePolicy a URL is opened under (None: permissive; an opened
    Source keeps its own). A SourceError raised by the source comes after the windows it completed.
    skip_windows: the first windows are decoded but not yielded, and not paced (a finite source
    resumed after a restart continues at window `skip_windows`, on time).
    """
    if not (window_s > 0 and fps > 0):
        raise ValueError(f"window_s and fps must be positive, got {window_s} and {fps}")
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise ValueError(f"size must be (H, W) with positive sides, got {size!r}")
    owned = isinstance(source, (str, os.PathLike))  # else an opened Source, or a PushSource
    src = Source(source, options, sample_rate=sample_rate, policy=policy) if owned else source
    if src.sample_rate != sample_rate:
        raise ValueError(f"the source resamples to {src.sample_rate} Hz but sample_rate={sample_rate}")
    try:
        if not src._opened:
            src.open()
        asm = WindowAssembler(
            window_s=window_s, fps=fps, sample_rate=sample_rate, has_audio=src.has_audio,
            has_video=src.has_video, live=src.live, options=src.options,
            size=tuple(size) if size else None, video_size=src.video_size,
            frame_duration=src.frame_duration, start_time=src.start_time,
            realtime=bool(realtime) and not src.live, unpaced_until_s=max(0, skip_windows) * window_s,
            declared_end=src.declared_end())
        try:
            for ev in src.events():
                asm.note_errors(src.decode_errors)
                yield from (w for w in asm.push(ev) if w.index >= skip_windows)
        except SourceError:
            asm.note_errors(src.decode_errors)
            yield from (w for w in asm.finish() if w.index >= skip_windows)
            raise
        asm.note_errors(src.decode_errors)
        yield from (w for w in asm.finish() if w.index >= skip_windows)
    finally:
        if owned:
            src.close()
