"""Ingestion of files with awkward properties into aligned 2-s windows (real ffmpeg-made media)."""
from __future__ import annotations

import math
import pickle
import time

import av
import numpy as np
import pytest

import media_fixtures as mf
from pipeline.errors import NotMediaError
from pipeline.sources.events import AudioChunk, VideoChunk
from pipeline.sources.spec import SourceOptions
from pipeline.sources.windows import AVWindow, WindowAssembler, iter_windows

SR, FPS, W = 16000, 2.0, 2.0


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return lambda name: mf.make(d, name)


def windows(path, **kw) -> list[AVWindow]:
    return list(iter_windows(path, **kw))


def check_grid(ws: list[AVWindow], n: int, hw=(48, 64)) -> None:
    """n consecutive windows of exact shape on the 2-s grid."""
    assert [w.index for w in ws] == list(range(n))
    for w in ws:
        assert (w.start, w.end) == (2.0 * w.index, 2.0 * w.index + 2.0)
        assert w.audio.dtype == np.float32 and w.audio.shape == (32000,)
        assert w.frames.dtype == np.uint8 and w.frames.shape == (4, *hw, 3)
        np.testing.assert_allclose(w.frame_times, w.start + np.arange(4) / FPS)


def check_on_screen(ws: list[AVWindow], rate: float) -> None:
    """Each sampled frame is the one on screen at its instant: the latest with pts <= t, and its
    pixels are that source frame (frame n has pts first + n / rate)."""
    first = ws[0].frame_pts[0]
    for w in ws:
        for t, pts, rgb in zip(w.frame_times, w.frame_pts, w.frames):
            if t < first:  # before the first frame: the first frame is shown early
                assert pts == first
                continue
            assert pts <= t + 1e-3 and t - pts < 1.0 / rate + 1e-3
            n = int(math.floor((t - first) * rate + 1e-3))
            assert mf.frame_number(rgb) == n % mf.LUMA_MOD


def tone_peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spec)])


def no_flags(w: AVWindow) -> bool:
    return not (w.audio_gap or w.video_gap or w.discontinuity or w.final)


def test_ntsc_29_97_fps_with_44k_stereo(media):
    ws = windows(media("ntsc_44k_stereo.mp4"))
    check_grid(ws, 3)
    check_on_screen(ws, 30000 / 1001)
    for w in ws:
        assert w.has_audio and w.has_video and no_flags(w)
        assert abs(tone_peak_hz(w.audio) - 440) < 2  # resampled 44.1 kHz -> 16 kHz at the right rate
        assert float(np.sqrt(np.mean(w.audio[1000:] ** 2))) > 0.03


def test_pal_with_5_1_audio(media):
    ws = windows(media("pal_51.mkv"))
    check_grid(ws, 3)
    check_on_screen(ws, 25)
    assert all(no_flags(w) for w in ws)
    assert all(abs(tone_peak_hz(w.audio) - 440) < 2 for w in ws)  # 5.1 downmixed to mono


def test_variable_frame_rate(media):
    ws = windows(media("vfr.webm"))
    check_grid(ws, 3)
    first = ws[0].frame_pts[0]
    times = np.array([mf.tone_vfr_time(n) for n in range(200)]) + first
    assert no_flags(ws[0]) and no_flags(ws[1])
    assert ws[2].final and ws[2].audio_filled_s < 0.1 and not ws[2].video_gap  # Vorbis ends early
    for w in ws:
        for t, pts, rgb in zip(w.frame_times, w.frame_pts, w.frames):
            n = max(0, int(np.searchsorted(times, t + 1e-3, side="right")) - 1)  # on screen at t
            assert pts == pytest.approx(times[n], abs=2e-3)
            assert mf.frame_number(rgb) == n % mf.LUMA_MOD
    assert abs(tone_peak_hz(ws[1].audio) - 440) < 2  # 22.05 kHz Vorbis


def test_audio_starting_late_is_flagged_silence(media):
    ws = windows(media("offset.mkv"))
    check_grid(ws, 3)
    w0 = ws[0]
    assert w0.audio_gap and not w0.video_gap
    assert 0.65 < w0.audio_filled_s < 0.72  # 0.7 s less the AAC priming the encoder moved it by
    assert not np.any(w0.audio[: int(0.65 * SR)])
    assert np.abs(w0.audio[int(0.75 * SR):]).min() >= 0 and np.sqrt(np.mean(w0.audio[int(0.75 * SR):] ** 2)) > 0.03
    assert w0.frame_pts[0] == 0.0  # video starts the timeline
    check_on_screen(ws, 25)
    assert not any(w.audio_gap for w in ws[1:])


def test_no_audio_track(media):
    ws = windows(media("video_only.mp4"))
    check_grid(ws, 3)
    check_on_screen(ws[:2], 25)
    assert all(not w.has_audio and w.has_video and not w.audio_gap for w in ws)
    assert all(not np.any(w.audio) for w in ws)
    last = ws[-1]  # 5 s of video: the last window holds the last frame past the end
    assert last.final and last.video_gap and last.video_filled == 1
    assert last.frame_pts[-1] == pytest.approx(4.96)


def test_no_video_track(media):
    ws = windows(media("audio_only.wav"))
    check_grid(ws, 3, hw=(0, 0))
    assert all(w.has_audio and not w.has_video and not w.video_gap for w in ws)
    assert all(np.isnan(w.frame_pts).all() for w in ws)
    assert abs(tone_peak_hz(ws[0].audio) - 440) < 2  # 8 kHz upsampled
    assert not ws[0].audio_gap and not ws[1].audio_gap
    assert ws[2].final and ws[2].audio_gap and ws[2].audio_filled_s == pytest.approx(1.0, abs=0.01)
    assert not np.any(ws[2].audio[int(1.01 * SR):])


def test_no_video_with_size_gives_black_frames(media):
    ws = windows(media("audio_only.wav"), size=(24, 32))
    assert ws[0].frames.shape == (4, 24, 32, 3) and not ws[0].frames.any()


def test_corrupted_bytes_in_the_middle(media):
    ws = windows(media("corrupt.ts"))
    check_grid(ws, 3)
    assert no_flags(ws[0])  # before the damage
    assert any(w.audio_gap or w.video_gap for w in ws[1:])  # the hole is filled and flagged
    for w in ws:
        assert np.all(np.diff(w.frame_pts) >= 0) and np.all(w.frame_pts <= w.frame_times + 1e-3 + (w.index == 0) * 0.1)


def test_truncated_file(media):
    ws = windows(media("truncated.mp4"))
    check_grid(ws, 2)
    check_on_screen(ws[:1], 25)
    assert no_flags(ws[0])
    last = ws[1]
    assert last.final and last.audio_gap and 0.0 < last.audio_filled_s < 2.0
    cut = int(round((2.0 - last.audio_filled_s) * SR))
    assert not np.any(last.audio[cut:])  # padding is silence


def test_truncated_file_without_index_is_not_media(media):
    with pytest.raises(NotMediaError, match="not a media"):
        windows(media("truncated_moov_at_end.mp4"))


def test_timestamp_jump_back_is_rebased_and_flagged(media):
    ws = windows(media("jump.ts"))  # two 4 s segments whose timestamps both start at 1.4 s
    check_grid(ws, 4)
    assert [w.discontinuity for w in ws] == [False, False, True, False]
    assert not any(w.audio_gap or w.video_gap for w in ws)
    pts = np.concatenate([w.frame_pts for w in ws])
    assert np.all(np.diff(pts) > 0)  # time keeps going forward
    fn = [mf.frame_number(f) for w in ws for f in w.frames]
    assert fn[8] == 99 % mf.LUMA_MOD and fn[9] == 11  # segment 1's frame 99 at 3.98 s, then
    # segment 2's frame 11 at 4.46 s (segment 2 starts where segment 1 ended, 4.02 s)


def test_lavfi_source_and_resize():
    g = "lavfi:testsrc2=size=320x240:rate=25,trim=duration=4[out0];sine=f=1000:sample_rate=48000,atrim=duration=4[out1]"
    ws = windows(g)
    check_grid(ws, 2, hw=(240, 320))
    assert all(no_flags(w) for w in ws)
    small = windows(g, size=(60, 80))
    check_grid(small, 2, hw=(60, 80))
    assert abs(tone_peak_hz(small[0].audio) - 1000) < 2


def test_paired_audio_input_is_merged():
    """A webcam with a separate sound card, played by two lavfi inputs read on two threads."""
    ws = windows("lavfi:testsrc2=size=64x48:rate=10,trim=duration=4",
                 options={"audio_device": "lavfi:sine=f=440:sample_rate=44100:duration=4"})
    check_grid(ws, 2)
    assert all(w.has_audio and w.has_video for w in ws)
    assert abs(tone_peak_hz(ws[0].audio) - 440) < 2


def test_realtime_paces_a_file():
    """realtime=True: no window is handed out before its end in wall time (a lower bound)."""
    t0 = time.monotonic()
    seen = []
    for w in iter_windows("lavfi:testsrc2=size=64x48:rate=10,trim=duration=2[out0];"
                          "sine=sample_rate=16000,atrim=duration=2[out1]",
                          window_s=0.5, realtime=True):
        seen.append((w.index, time.monotonic() - t0))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    for i, wall in seen[:-1]:
        assert wall >= (i + 1) * 0.5 - 0.1


def test_windows_pickle():
    w = windows("lavfi:testsrc2=size=64x48:rate=10,trim=duration=2")[0]
    back = pickle.loads(pickle.dumps(w))
    assert back.index == w.index and np.array_equal(back.frames, w.frames)
    assert np.array_equal(back.audio, w.audio) and back.has_audio is False


def _frame(value: int) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.full((8, 8, 3), value, np.uint8), format="rgb24")


def test_assembler_out_of_order_and_overlap():
    """Out-of-order frames after decoding are dropped; overlapping audio is not counted twice;
    small audio jitter is absorbed without a flag, a real hole is flagged."""
    asm = WindowAssembler(window_s=2.0, fps=2.0, sample_rate=SR, has_audio=True, has_video=True,
                          live=False, options=SourceOptions(video_gap_s=1.0))
    out = []
    evs = [VideoChunk(0.0, _frame(10)), VideoChunk(0.6, _frame(20)), VideoChunk(0.3, _frame(99)),
           AudioChunk(0.0, np.ones(8000, np.float32)),
           AudioChunk(0.4, np.full(8000, 2.0, np.float32)),  # overlaps 0.1 s: that part dropped
           AudioChunk(0.905, np.full(3 * SR, 3.0, np.float32)),  # 5 ms late: jitter, not a hole
           VideoChunk(1.2, _frame(30)), VideoChunk(2.1, _frame(40))]
    for ev in evs:
        out += list(asm.push(ev))
    assert len(out) == 1 and asm.dropped_frames == 1
    w = out[0]
    assert [int(f.mean()) for f in w.frames] == [10, 10, 20, 30]  # on screen at 0, .5, 1, 1.5
    np.testing.assert_allclose(w.frame_pts, [0.0, 0.0, 0.6, 1.2])
    assert not w.audio_gap and not w.video_gap
    assert w.audio[7999] == 1 and w.audio[8000] == 2 and w.audio[14399] == 2
    assert not w.audio[14400:14480].any() and w.audio[14480] == 3  # 5 ms jitter: silent, unflagged
    out = list(asm.push(AudioChunk(5.0, np.ones(SR, np.float32)))) + list(asm.finish())
    assert [w.index for w in out] == [1, 2]
    w1, w2 = out
    assert w1.audio_gap and w1.audio_filled_s == pytest.approx(0.095, abs=1e-3)  # 3.905 -> 4.0
    np.testing.assert_allclose(w1.frame_pts, [1.2, 2.1, 2.1, 2.1])
    assert w1.video_gap and w1.video_filled == 1  # 3.5 is 1.4 s after the last frame: held
    assert w2.final and w2.audio_filled_s == pytest.approx(1.0) and w2.video_filled == 4
    assert not w2.audio[: SR].any() and w2.audio[SR:].all()


def test_finite_paired_inputs_are_merged_in_media_time_order():
    """A separate audio input that starts late must not let the video run ahead of it (a window
    would close before its audio arrived): finite inputs are interleaved by media time."""
    from pipeline.sources.events import merge_by_time

    def video():
        for i in range(8):
            yield VideoChunk(i * 0.5, None)

    def late_audio():
        time.sleep(0.3)
        for i in range(4):
            yield AudioChunk(i * 1.0, np.zeros(16000, np.float32))

    merged = list(merge_by_time([video(), late_audio()]))
    times = [ev.t for ev in merged]
    assert times == sorted(times) and len(merged) == 12
    assert [type(ev).__name__ for ev in merged[:3]] == ["VideoChunk", "AudioChunk", "VideoChunk"]
