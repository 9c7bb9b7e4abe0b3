"""Independent float64 computations the tests hold every backend (reference included) to.

Written without tokengine.reference, from the contracts in DESIGN.md.
"""

import math

import torch
import torch.nn.functional as F


def out_grid(tokens: int) -> tuple[int, int]:
    h = max(d for d in range(1, tokens + 1) if tokens % d == 0 and d * d <= tokens)
    return h, tokens // h


def bins(size: int, out: int) -> list[tuple[int, int]]:
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def grid_pool(x, tokens, grid, mode, scores=None):
    """avg / max via torch's adaptive pooling, weighted by explicit per-bin loops (float64)."""
    x = x.double()
    B, N, D = x.shape
    h, w = out_grid(tokens)
    if mode in ("avg", "max"):
        img = x.transpose(1, 2).reshape(B, D, *grid)
        pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
        return pool(img, (h, w)).flatten(2).transpose(1, 2)
    s = scores.double()
    out = []
    for r0, r1 in bins(grid[0], h):
        for c0, c1 in bins(grid[1], w):
            idx = torch.tensor([r * grid[1] + c for r in range(r0, r1) for c in range(c0, c1)])
            xs, ss = x[:, idx], s[:, idx]
            total = ss.sum(1, keepdim=True)
            weighted = (ss.unsqueeze(-1) * xs).sum(1) / total.where(total > 0, 1.0)
            out.append(torch.where(total > 0, weighted, xs.mean(1)))
    return torch.stack(out, 1)


def topk_pool(x, scores, tokens):
    """Python sort by (score desc, index asc), then ascending index order."""
    idx = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        idx.append(sorted(order[:tokens]))
    idx = torch.tensor(idx, dtype=torch.int64)
    return torch.stack([x[b, idx[b]] for b in range(x.shape[0])]).double(), idx


def qc_attention(q, k_img, v_img, k_txt, v_txt, cu, scale):
    """Per sample and head: concatenate the keys, softmax, weight the values (float64)."""
    B, L, H, D = q.shape
    group = H // k_img.shape[2]
    out = torch.empty(B, L, H, D, dtype=torch.float64)
    mass = torch.zeros(B, k_img.shape[1], dtype=torch.float64)
    for b in range(B):
        s, e = (int(cu[b]), int(cu[b + 1])) if k_txt is not None else (0, 0)
        for hh in range(H):
            g = hh // group
            keys = k_img[b, :, g].double()
            vals = v_img[b, :, g].double()
            if k_txt is not None:
                keys = torch.cat([keys, k_txt[s:e, g].double()])
                vals = torch.cat([vals, v_txt[s:e, g].double()])
            p = torch.softmax(q[b, :, hh].double() @ keys.T * scale, dim=-1)
            out[b, :, hh] = p @ vals
            mass[b] += p[:, : k_img.shape[1]].sum(0)
    return out, mass / (H * L)
