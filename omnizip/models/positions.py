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
