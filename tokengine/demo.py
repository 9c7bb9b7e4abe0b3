"""``python -m tokengine.demo``: a short tour of the ops on LLaVA-1.5-shaped random tokens.

Pools a batch of 24x24 = 576 vision tokens to several N_l, runs question-conditioned
cross-attention with the attention mass, uses the mass for question-guided pooling, and checks
every available backend against the reference, with timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokengine import backends
from tokengine.ops import qc_cross_attention, token_pool
from tokengine.validation import add_device_argument


def _timed(fn, repeats: int = 3):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return result, (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokengine.demo", description=__doc__)
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    usable = [n for n, why in backends.status(device).items() if why is None]
    print(f"device {device}; usable backends: {', '.join(usable)}")

    B, D = 4, 1024  # LLaVA-1.5: 576 CLIP tokens of width 1024
    image = torch.randn(B, 576, D, device=device)
    print(f"\ntoken_pool: image tokens {tuple(image.shape)} -> N_l tokens (mode avg)")
    print(f"{'N_l':>5} {'out':>16} " + " ".join(f"{n + ' ms':>13}" for n in usable))
    for tokens in (1, 16, 64, 144, 256, 576):
        ref = token_pool(image, tokens, backend="reference")
        cells = []
        for name in usable:
            out, ms = _timed(lambda n=name, t=tokens: token_pool(image, t, backend=n))
            assert torch.allclose(out, ref, atol=1e-5), f"{name} disagrees with the reference"
            cells.append(f"{ms:13.3f}")
        print(f"{tokens:>5} {str(tuple(ref.shape)):>16} " + " ".join(cells))

    L, H, Hd, T = 64, 16, 64, 32  # fusion-module shapes: 64 queries, 16 heads x 64
    q = torch.randn(B, L, H, Hd, device=device)
    k_img, v_img = torch.randn(2, B, 576, H, Hd, device=device)
    lengths = torch.tensor([T, T // 2, 0, T + 5])  # one sample without a question
    k_txt, v_txt = torch.randn(2, int(lengths.sum()), H, Hd, device=device)
    cu = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32).to(device)
    print(
        f"\nqc_cross_attention: q {tuple(q.shape)}, 576 image keys, question lengths "
        f"{lengths.tolist()}, with the attention mass"
    )
    ref_out, ref_mass = qc_cross_attention(
        q, k_img, v_img, k_txt, v_txt, cu, return_attn_mass=True, backend="reference"
    )
    for name in usable:
        (out, mass), ms = _timed(
            lambda n=name: qc_cross_attention(
                q, k_img, v_img, k_txt, v_txt, cu, return_attn_mass=True, backend=n
            )
        )
        err = (out - ref_out).abs().max().item()
        print(
            f"  {name:<10} {ms:9.3f} ms   max |out - reference| {err:.2e}   "
            f"image share of attention per sample {[round(m, 3) for m in mass.sum(-1).tolist()]}"
        )

    keep, idx = token_pool(image, 64, mode="topk", scores=ref_mass)
    print(
        f"\nquestion-guided top-64 pooling kept tokens {tuple(keep.shape)}; first indices of "
        f"sample 0: {idx[0, :8].tolist()}"
    )


if __name__ == "__main__":
    main()
