"""The kernel-core issue's GPU goals, timed with CUDA events (median of triton's do_bench).

    python bench/gpu_goals.py [--json PATH]

1. The card's copy bandwidth (a 1 GiB device-to-device copy, bytes read + written): the
   ceiling that token pooling is held against.
2. token_pool at (B=64, 576 -> 144, D=1024, bf16) per backend, as a share of that ceiling
   (goal: >= 80% for avg), beside ``adaptive_avg_pool2d``.
3. qc_cross_attention at (B=32, L=256, N=576, 32 question tokens, H=16, D=64, bf16) per
   backend against torch.cat + SDPA (goal >= 1.5x), and with the attention mass against
   cat + an explicit softmax (goal >= 5x).

Each fast path is first checked against the float64 reference on the same inputs
(||out - ref|| / ||ref||), so a wrong kernel is never timed as a fast one.
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial

import torch
import torch.nn.functional as F
from test_bench_ops import attn_bytes, attn_inputs, concatenated_kv, pool_bytes, pool_inputs
from triton.testing import do_bench

from tokengine import backends
from tokengine.ops import qc_cross_attention, token_pool

DTYPE = torch.bfloat16
POOL = (64, 1024, 144)  # B, D, N_l
ATTN = (32, 256, 576, 32, 16, 64)  # B, L, N, T per sample, H, D
BF16_REL_ERR = 1e-2  # bf16 operands, fp32 accumulation: 1e-3..1e-2 (METHOD.md)


def median_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def usable_backends() -> list[str]:
    dev = torch.device("cuda")
    return [b for b in backends.BACKENDS if not backends.unavailable_reason(b, dev, DTYPE)]


def pool_rows(ceiling: float) -> list[dict]:
    B, D, tokens = POOL
    x, scores = pool_inputs(B, D, DTYPE)
    rows, refs = [], {}
    for mode in ("avg", "weighted"):
        s = None if mode == "avg" else scores
        s64 = None if s is None else s.double()
        refs[mode] = token_pool(x.double(), tokens, mode=mode, scores=s64, backend="reference")
        nbytes = pool_bytes(x, tokens, s is not None)
        for backend in usable_backends():
            fn = partial(token_pool, x, tokens, mode=mode, scores=s, backend=backend)
            rows.append(row(f"token_pool {mode}", backend, fn(), refs[mode], median_ms(fn), nbytes))
    h = 12  # 144 = 12 x 12
    img = x.transpose(1, 2).reshape(B, D, 24, 24)

    def base():
        return F.adaptive_avg_pool2d(img, (h, tokens // h)).flatten(2).transpose(1, 2)

    nbytes = pool_bytes(x, tokens)
    rows.append(
        row("token_pool avg", "adaptive_avg_pool2d", base(), refs["avg"], median_ms(base), nbytes)
    )
    for r in rows:
        r["share_of_copy"] = r["GB/s"] / ceiling
    return rows


def attn_rows() -> list[dict]:
    inputs = attn_inputs(*ATTN, dtype=DTYPE)
    N = ATTN[2]
    ref_out, ref_mass = qc_cross_attention(
        *[t.double() if t.is_floating_point() else t for t in inputs],
        return_attn_mass=True,
        backend="reference",
    )
    rows = []
    for with_mass in (False, True):
        op = "qc_attention out+mass" if with_mass else "qc_attention out"
        nbytes = attn_bytes(inputs, with_mass)
        for backend in usable_backends():
            fn = partial(qc_cross_attention, *inputs, return_attn_mass=with_mass, backend=backend)
            got = fn()
            rows.append(
                row(
                    op,
                    backend,
                    got,
                    (ref_out, ref_mass) if with_mass else ref_out,
                    median_ms(fn),
                    nbytes,
                )
            )

    def cat_sdpa():
        q, k, v = concatenated_kv(inputs)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def cat_softmax_mass():
        q, k, v = concatenated_kv(inputs)
        p = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
        return (p.to(v.dtype) @ v).transpose(1, 2), p[..., :N].mean(dim=(1, 2))

    rows.append(
        row(
            "qc_attention out",
            "cat + SDPA",
            cat_sdpa(),
            ref_out,
            median_ms(cat_sdpa),
            attn_bytes(inputs, False),
        )
    )
    rows.append(
        row(
            "qc_attention out+mass",
            "cat + softmax + mean",
            cat_softmax_mass(),
            (ref_out, ref_mass),
            median_ms(cat_softmax_mass),
            attn_bytes(inputs, True),
        )
    )
    return rows


def row(op: str, impl: str, got, ref, ms: float, nbytes: int) -> dict:
    got, ref = (got, ref) if isinstance(ref, tuple) else ((got,), (ref,))
    err = max(rel_err(g, r) for g, r in zip(got, ref, strict=True))
    return {
        "op": op,
        "impl": impl,
        "ms": ms,
        "GB/s": nbytes / ms / 1e6,
        "rel_err": err,
        "correct": err < BF16_REL_ERR,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'op':<24}{'impl':<22}{'ms':>9}{'GB/s':>9}{'x base':>8}{'rel err':>10}{'% copy BW':>11}"
    )
    for op in dict.fromkeys(r["op"] for r in rows):
        members = [r for r in rows if r["op"] == op]
        base = [r["ms"] for r in members if r["impl"] not in backends.BACKENDS]
        for r in sorted(members, key=lambda r: r["ms"]):
            r["speedup"] = base[0] / r["ms"] if base else None
            speedup = f"{r['speedup']:>7.2f}x" if base else " " * 8
            share = f"{100 * r['share_of_copy']:>10.0f}%" if "share_of_copy" in r else ""
            flag = "" if r["correct"] else "  WRONG"
            print(
                f"{op:<24}{r['impl']:<22}{r['ms']:>9.4f}{r['GB/s']:>9.0f}{speedup}"
                f"{r['rel_err']:>10.1e}{share}{flag}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_goals.py needs a CUDA device")
    torch.manual_seed(0)
    ceiling = copy_bandwidth()
    rows = pool_rows(ceiling) + attn_rows()
    print(f"{torch.cuda.get_device_name()}: copy {ceiling:.0f} GB/s (read + write)")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "copy_GBps": ceiling,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
