"""TMRoPE position ids (t, h, w) of Qwen2.5-Omni with audio in video, computed per window.

Same numbers as transformers' `get_rope_index(use_audio_in_video=True)` (tested against it): with the
multimodal block starting at `offset`, window k's video frame f (0 or 1) gets
(offset + 50k + 25f, offset + row, offset + col) and its audio token j (0..49) gets offset + 50k + j
on all three axes. Text after the block continues at max(position) + 1.
"""

from __future__ import annotations

import torch

POSITIONS_PER_SECOND = 25
SECONDS_PER_WINDOW = 2
POSITIONS_PER_WINDOW = POSITIONS_PER_SECOND * SECONDS_PER_WINDOW
SECONDS_PER_LLM_FRAME = 1.0  # temporal_patch_size 2 / 2 fps


def window_position_ids(index: int, llm_grid_hw: tuple[int, int], n_frames: int = 2, n_audio: int = 50,
                        offset: int = 0) -> torch.Tensor:
    """[3, n_frames*gh*gw + n_audio] positions of window `index`: its video tokens, then its audio."""
    gh, gw = llm_grid_hw
    t0 = offset + index * POSITIONS_PER_WINDOW
    per_frame = gh * gw
    frame_t = torch.arange(n_frames) * int(POSITIONS_PER_SECOND * SECONDS_PER_LLM_FRAME)
    t = frame_t.repeat_interleave(per_frame) + t0
    h = torch.arange(gh).repeat_interleave(gw).repeat(n_frames) + offset
    w = torch.arange(gw).repeat(gh * n_frames) + offset
    audio = (torch.arange(n_audio) + t0).expand(3, -1)
    return torch.cat([torch.stack([t, h, w]), audio], dim=1).long()


def text_position_ids(n: int, start: int) -> torch.Tensor:
    """[3, n] positions of plain text starting at `start` (all three axes equal)."""
    return (torch.arange(n) + start).expand(3, -1).long()


def renumber_delta(n_video: int, n_audio: int, positions_back: int) -> torch.Tensor:
    """[3, n] position change of a window's kept tokens (video first, then audio) when the stream is
    renumbered `positions_back` time positions earlier.

    A video token's (t, h, w) is (start + 25f, offset + row, offset + col): only t moves. An audio token
    has t = h = w: all three move. The result is what `window_position_ids` gives at the earlier index.
    """
    d = torch.full((3, n_video + n_audio), -int(positions_back), dtype=torch.long)
    d[1:, :n_video] = 0
    return d


class RopeShift:
    """Exact re-rotation of cached keys whose positions move, derived from and checked on the model's rotary module.

    RoPE rotates each pair of key dimensions (d, d + head_dim/2) by position * freq_d; with TMRoPE each
    pair takes its position from one axis, chosen by `mrope_section`. Moving a token by a per-axis delta
    is then one extra rotation per pair by delta[axis(d)] * freq_d (rotations add). In particular a shift
    of all three axes by one delta is one rotation per frequency. The constructor probes the module (the
    layout, pairs sharing one axis and frequency, composition of rotations) and refuses a module for which
    a shift is not a rotation (e.g. dynamic frequency scaling).
    """

    def __init__(self, rotary: torch.nn.Module, rotate_half, head_dim: int) -> None:
        self.rotate_half = rotate_half
        self.rotary = rotary
        self.head_dim = head_dim
        self.axis_of_dim, self.freq = self._probe()
        self._check_composition()

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model's own cos/sin [n, head_dim] (float32, attention scaling undone) at positions [3, n]."""
        dev = self.rotary.inv_freq.device
        x = torch.zeros(1, dtype=torch.float32, device=dev)
        cos, sin = self.rotary(x, pos[:, None].to(dev))
        scale = float(getattr(self.rotary, "attention_scaling", 1.0))
        return cos[0].float() / scale, sin[0].float() / scale

    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        hd, half = self.head_dim, self.head_dim // 2
        _, sin_axes = self._cos_sin(torch.eye(3, dtype=torch.long))  # column a: position 1 on axis a only
        moved = sin_axes.abs() > 0  # [3, hd]: which dims axis a rotates
        if hd % 2 or not torch.equal(moved.sum(0), torch.ones(hd, dtype=torch.long, device=moved.device)):
            raise RuntimeError("rotary layout: every key dimension must take its position from exactly one axis")
        axis = moved.long().argmax(0)
        cos1, sin1 = self._cos_sin(torch.ones(3, 1, dtype=torch.long))
        freq = torch.atan2(sin1[0], cos1[0]).double()
        inv = self.rotary.inv_freq.double().to(freq.device)
        if not (torch.equal(axis[:half], axis[half:]) and torch.allclose(freq[:half], inv, rtol=1e-6)
                and torch.allclose(freq[half:], inv, rtol=1e-6)):
            raise RuntimeError("rotary layout: a rotated pair (d, d + head_dim/2) must share one axis and frequency")
        section = getattr(self.rotary, "mrope_section", None)
        if section is not None:
            expect = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(section)]).to(axis.device)
            if not torch.equal(axis[:half], expect):
                raise RuntimeError(f"rotary layout does not follow mrope_section {section}")
        return axis.cpu(), inv.repeat(2).cpu()

    def _check_composition(self) -> None:
        g = torch.Generator().manual_seed(0)
        p = torch.randint(0, 4000, (3, 16), generator=g)
        d = torch.randint(-3000, 3000, (3, 16), generator=g)
        k = torch.randn(16, self.head_dim, generator=g, dtype=torch.float64)
        c0, s0 = (t.double().cpu() for t in self._cos_sin(p))
        c1, s1 = (t.double().cpu() for t in self._cos_sin(p + d))
        at_p = k * c0 + self.rotate_half(k) * s0
        if not torch.allclose(self(d)(at_p), k * c1 + self.rotate_half(k) * s1, atol=1e-3):
            raise RuntimeError("rotary module: a position shift is not a key rotation (dynamic scaling?)")

    def __call__(self, delta: torch.Tensor):
        """A function rotating keys [..., n, head_dim] by position deltas [3, n] (angles in float64)."""
        angles = delta.cpu().double()[self.axis_of_dim].T * self.freq  # [n, hd]
        cos, sin = angles.cos(), angles.sin()

        def rotate(keys: torch.Tensor) -> torch.Tensor:
            dt = torch.float64 if keys.dtype == torch.float64 else torch.float32  # rotate in >= fp32
            c, s, k = cos.to(keys.device, dt), sin.to(keys.device, dt), keys.to(dt)
            return (k * c + self.rotate_half(k) * s).to(keys.dtype)

        return rotate
