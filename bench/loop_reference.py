"""A plain reading of SPEC sections 2.1-2.3 in torch, one anchor, one frame and one token at a time.

It is the baseline that ``bench/compress.py`` times ``omnizip.compress_clip`` against, and an
independent cross-check in the tests. Written as the spec reads: the one cross-modal matrix
product and each frame's distance matrix are single torch calls; every per-token step (assign
to an anchor, a token's density, its delta, its temporal change) is a torch call on that
token's row; per-anchor merging is a loop over anchors. No batching across tokens or frames."""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def _top_indices(values: list[float], k: int, highest: bool = True) -> list[int]:
    """Indices of the k highest (or lowest) values, ties to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-values[i] if highest else values[i], i))
    return order[:k]


def reference_compress(audio, scores, video, audio_group_sizes, video_group_frames, cfg):
    """Returns (audio_keep, audio, video_keep, video_ratios) like ``compress_clip``."""
    work = torch.float64 if audio.dtype == torch.float64 else torch.float32
    a = audio.to(work)
    v = video.to(work)
    na = a.shape[0]
    num_frames, p = v.shape[0], v.shape[1]

    # 2.1 audio
    score_list = scores.tolist()
    n_dom = round((1 - cfg.rho_audio) * na)
    dominant = set(_top_indices(score_list, n_dom))
    rest = [i for i in range(na) if i not in dominant]
    c = min(round(cfg.contextual_ratio * na), len(rest))
    anchors: list[int] = []
    if c > 0:
        step = max(1, len(rest) // c)
        anchors = rest[::step][:c]
    pool = [i for i in rest if i not in set(anchors)]
    out_audio = audio.clone()
    if anchors and pool and cfg.g > 0:
        a_unit = _unit(a)
        v_flat = _unit(v.reshape(-1, v.shape[-1])) if num_frames * p else None
        cross_all = (a_unit[pool] @ v_flat.T).max(dim=1).values.tolist() if v_flat is not None else None
        assigned: dict[int, list[tuple[float, int]]] = {j: [] for j in range(len(anchors))}
        anchor_unit = a_unit[anchors]
        for n, tok in enumerate(pool):
            sims = (anchor_unit @ a_unit[tok]).tolist()
            best = max(range(len(anchors)), key=lambda j: (sims[j], -j))
            cross = cross_all[n] if cross_all is not None else max(sims)
            assigned[best].append((cross, tok))
        for j, anc in enumerate(anchors):
            members = sorted(assigned[j], key=lambda st: (-st[0], st[1]))[: cfg.g]
            if not members:
                continue
            w = torch.softmax(torch.tensor([m[0] for m in members], dtype=work), dim=0)
            acc = a[anc].clone()
            for wi, (_, tok) in zip(w, members):
                acc = acc + wi * a[tok]
            out_audio[anc] = (acc / (1 + w.sum())).to(audio.dtype)
    keep_audio = torch.zeros(na, dtype=torch.bool)
    for i in list(dominant) + anchors:
        keep_audio[i] = True

    # 2.2 budget
    def clamp(x):
        return min(max(x, cfg.min_ratio), cfg.max_ratio)

    ratios, start = [], 0
    has_audio = []
    for size in audio_group_sizes:
        if size:
            r = int(keep_audio[start:start + size].sum()) / size
            ratios.append(clamp(cfg.max_ratio + (cfg.min_ratio - cfg.max_ratio) * r))
        else:
            ratios.append(cfg.rho_video)
        has_audio.append(size > 0)
        start += size
    idx = [i for i, h in enumerate(has_audio) if h]
    if len(idx) > 2:
        s = [video_group_frames[i] * p for i in range(len(ratios))]
        target = cfg.rho_video * sum(s[i] for i in idx)
        base = sum(ratios[i] * s[i] for i in idx)
        lo = min(idx, key=lambda i: (ratios[i], i))
        hi = max(idx, key=lambda i: (ratios[i], -i))
        others = [i for i in idx if i not in (lo, hi)]
        if abs(base - target) > 1e-3 and base != 0 and others:
            fixed = sum(ratios[i] * s[i] for i in {lo, hi})
            denom = sum(ratios[i] * s[i] for i in others)
            if denom > 0:
                for i in others:
                    ratios[i] = clamp(ratios[i] * (target - fixed) / denom)
            diff = target - sum(ratios[i] * s[i] for i in idx)
            tok = sum(s[i] for i in others)
            if abs(diff) > 1e-3 and tok > 0:
                for i in others:
                    ratios[i] = clamp(ratios[i] + diff / tok)

    # 2.3 ISTC, frame by frame, token by token
    keep_video = torch.zeros(num_frames, p, dtype=torch.bool)
    f0 = 0
    for g_idx, nf in enumerate(video_group_frames):
        n_keep = math.floor(p * (1 - ratios[g_idx]))
        for t in range(nf):
            f = f0 + t
            if n_keep >= p:
                keep_video[f] = True
                continue
            frame = _unit(v[f])
            if t % 2 == 0:
                dist = 1 - frame @ frame.T
                dist = (dist + dist.T) / 2  # d(i, j) and d(j, i) are one number
                k = min(cfg.knn_k, p - 1)
                rho = torch.empty(p, dtype=work)
                for i in range(p):  # density of each token from its k nearest others
                    others = torch.cat([dist[i, :i], dist[i, i + 1:]])
                    rho[i] = torch.exp(-torch.topk(others, k, largest=False).values.mean())
                score = []
                for i in range(p):  # distance to the nearest denser token, else the farthest one
                    denser = rho > rho[i]
                    if bool(denser.any()):
                        delta = dist[i][denser].min()
                    else:
                        delta = torch.cat([dist[i, :i], dist[i, i + 1:]]).max()
                    score.append(float(rho[i] * delta))
                chosen = _top_indices(score, n_keep)
            else:
                prev = _unit(v[f - 1])
                cos = [float(frame[i] @ prev[i]) for i in range(p)]  # token by token
                chosen = _top_indices(cos, n_keep, highest=False)
            keep_video[f, chosen] = True
        f0 += nf
    return keep_audio, out_audio, keep_video, ratios
