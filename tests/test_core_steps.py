"""Each OmniZip step pinned on small hand-made cases whose answer is worked out by hand."""
import math

import pytest
import torch

from omnizip import OmniZipConfig
from omnizip.audio import select_audio, VideoRef
from omnizip.budget import base_ratio, offline_video_ratios
from omnizip.ops import inverse_norm, top_k_mask
from omnizip.video import istc_keep


def test_top_k_breaks_ties_by_lower_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    assert top_k_mask(scores, 3).tolist() == [True, True, False, True, False]


def test_dominant_tokens_and_evenly_spaced_anchors():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05, 0.5, 0.15])
    audio = torch.randn(10, 4)
    # n_dom = round(0.6 * 10) = 6 -> {0, 2, 4, 5, 6, 8}; rest = [1, 3, 7, 9];
    # C = round(0.2 * 10) = 2, step = 4 // 2 = 2 -> anchors rest[0], rest[2] = 1, 7.
    sel = select_audio(audio, scores, 6, 0.2, 3, None)
    assert sel.anchors.tolist() == [1, 7]
    assert torch.nonzero(sel.keep).squeeze(1).tolist() == [0, 1, 2, 4, 5, 6, 7, 8]


def test_pool_tokens_merge_into_the_nearest_anchor():
    audio = torch.zeros(10, 2)
    audio[1] = torch.tensor([1.0, 0.0])  # anchor
    audio[7] = torch.tensor([0.0, 1.0])  # anchor
    audio[3] = torch.tensor([2.0, 0.1])  # nearest to anchor 1
    audio[9] = torch.tensor([0.1, 3.0])  # nearest to anchor 7
    for i in (0, 2, 4, 5, 6, 8):
        audio[i] = torch.tensor([1.0, 1.0])
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05, 0.5, 0.15])
    sel = select_audio(audio, scores, 6, 0.2, 3, None)
    # One member per anchor: softmax weight 1, so the anchor becomes the mean of the two.
    assert torch.allclose(sel.audio[1], torch.tensor([1.5, 0.05]))
    assert torch.allclose(sel.audio[7], torch.tensor([0.05, 2.0]))
    untouched = [0, 2, 3, 4, 5, 6, 8, 9]
    assert torch.equal(sel.audio[untouched], audio[untouched])


def test_merge_takes_the_g_members_closest_to_the_video_with_softmax_weights():
    audio = torch.tensor(
        [[5.0, 5, 5], [4, 4, 4], [0.0, 1, 0], [1, 0, 1], [1, 0, 2], [1, 0, 0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.05])
    video = torch.tensor([[[0.0, 0.0, 1.0]]])  # one frame, one token
    ref = VideoRef.from_frames(video)
    # n_dom = 2 -> {0, 1}; rest [2,3,4,5]; C = 1 -> anchor 2; pool [3,4,5], all to anchor 2.
    sel = select_audio(audio, scores, 2, 1 / 6, 2, ref)
    assert sel.anchors.tolist() == [2]
    cos3 = 1 / (math.sqrt(2) + 1e-6)
    cos4 = 2 / (math.sqrt(5) + 1e-6)
    w = torch.softmax(torch.tensor([cos4, cos3]), 0)
    expected = (audio[2] + w[0] * audio[4] + w[1] * audio[3]) / (1 + w.sum())
    assert torch.allclose(sel.audio[2], expected, atol=1e-6)
    assert sel.keep.tolist() == [True, True, True, False, False, False]


def test_without_video_the_cross_modal_score_is_the_best_anchor_cosine():
    audio = torch.tensor([[5.0, 5, 5], [4, 4, 4], [0.0, 1, 0], [0.0, 1, 2], [0.0, 1, 0.1], [1, 0, 0]])
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.05])
    sel = select_audio(audio, scores, 2, 1 / 6, 1, None)
    # g = 1: the single member is the pool token most similar to the anchor: token 4.
    assert torch.allclose(sel.audio[2], (audio[2] + audio[4]) / 2)


def test_base_ratio_maps_dense_audio_to_less_video_discard():
    cfg = OmniZipConfig()
    assert base_ratio(1.0, cfg) == pytest.approx(0.35)
    assert base_ratio(0.0, cfg) == pytest.approx(0.75)
    assert base_ratio(0.5, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "rho_video, expected",
    [
        (0.5, [0.35, 0.495, 0.75, 0.405]),  # scale only: (200 - 110) / 100 = 0.9
        (0.66, [0.35, 0.75, 0.75, 0.7415]),  # scale clamps group 1, additive step fills the rest
        (0.7, [0.35, 0.75, 0.75, 0.75]),  # bounds bind: target unreachable
    ],
)
def test_offline_normalisation_by_hand(rho_video, expected):
    cfg = OmniZipConfig(rho_video=rho_video)
    # r = 1, 0.5, 0, 0.75 -> b = 0.35, 0.55, 0.75, 0.45; smallest (0) and largest (2) fixed.
    ratios = offline_video_ratios([1.0, 0.5, 0.0, 0.75], [100] * 4, cfg)
    assert ratios == pytest.approx(expected, abs=1e-9)


def test_groups_without_audio_use_rho_video_and_few_groups_are_not_normalised():
    cfg = OmniZipConfig(rho_video=0.6)
    assert offline_video_ratios([None, 1.0, 0.0], [100] * 3, cfg) == pytest.approx([0.6, 0.35, 0.75])


def test_temporal_frames_keep_what_changed():
    torch.manual_seed(0)
    first = torch.randn(1, 6, 8)
    second = first.clone()
    second[0, 1] = torch.randn(8)
    second[0, 4] = -first[0, 4]
    video = torch.cat([first, second])
    keep = istc_keep(video, inverse_norm(video), [2], [0.6], knn_k=5)  # floor(6 * 0.4) = 2
    assert torch.nonzero(keep[1]).squeeze(1).tolist() == [1, 4]
    assert int(keep[0].sum()) == 2


def test_spatial_frames_keep_density_peaks():
    # Cluster A around (1, 0) with its centre first; cluster B around (0, 1).
    frame = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [0.05, 1.0]]).unsqueeze(0)
    keep = istc_keep(frame, inverse_norm(frame), [1], [0.55], knn_k=2)  # floor(5 * 0.45) = 2
    assert torch.nonzero(keep[0]).squeeze(1).tolist() == [0, 4]


def test_parity_restarts_in_each_group_and_zero_ratio_keeps_everything():
    torch.manual_seed(1)
    video = torch.randn(3, 8, 4)
    keep = istc_keep(video, inverse_norm(video), [1, 2], [0.0, 0.5], knn_k=3)
    assert keep[0].all()
    assert keep[1:].sum(dim=1).tolist() == [4, 4]
