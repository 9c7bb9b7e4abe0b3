"""Compile every Triton kernel the wrappers launch, offline, for sm_80 and sm_90 (no GPU needed).

The tests run the kernels under the Triton interpreter, which accepts code that the real
compiler rejects. This script builds each kernel variant the wrappers in ``token_pool.py`` and
``qc_attention.py`` can launch (every mode / constexpr branch, each dtype, the wrappers' own
tile configs for a few representative shapes) with the real compiler down to a cubin, and
prints one line per variant: ok/FAIL, shared memory, registers and per-thread stack + local
memory bytes (register spills; from cuobjdump). Exits 1 if any variant fails to compile or
exceeds the launch limits (shared memory per block, registers per SM).

Usage: ``python kernels/compile_check.py [-j JOBS]`` (any TRITON_INTERPRET is ignored).

Argument types follow Triton's launch-time specialisation: an int argument equal to 1 becomes
a constexpr, other ints are i32 (tagged divisible by 16 when they are), and pointers (fresh
torch allocations) are tagged 16-byte aligned. Scalar values come from contiguous tensors of
the representative shapes, exactly as the wrappers pass them.
"""

from __future__ import annotations

import os
import sys

# Under TRITON_INTERPRET=1 @triton.jit kernels become InterpretedFunctions: drop it before
# triton (or the kernels) are imported, here and in the worker processes.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import NamedTuple  # noqa: E402

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qc_attention as qa  # noqa: E402
from kernels import token_pool as tp  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
DIV16 = [["tt.divisibility", 16]]
MAX_SHARED = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)

# Representative shapes: a 24x24 image grid pooled to 8x8 = 64 tokens, hidden size D.
B, GRID, OUT, TOPK = 2, 24, 8, 64
POOL_DIMS = (1024, 40)
# Attention: 8 query heads over 2 KV heads (GQA), 576 image keys, 40 packed question keys.
H, HKV, NKEYS, TTXT = 8, 2, 576, 40
HEAD_DIMS = (40, 64, 128, 256)
QUERIES = (256, 16)  # 16 hits _fwd_config's small-L branch (BLOCK_M clamp, fewer warps)


class Variant(NamedTuple):
    label: str
    kernel: str  # "module.function"
    args: tuple  # positional arguments as the wrapper passes them ("*fp16" for pointers)
    consts: dict  # keyword (constexpr) arguments as the wrapper passes them
    num_warps: int
    num_stages: int = 3  # Triton's default when the wrapper does not pass num_stages


# ---------------------------------------------------------------------------- token_pool


def pool_variants(dt: str, D: int) -> list[Variant]:
    p, f32, N = f"*{dt}", "*fp32", GRID * GRID
    grid = (GRID, GRID, OUT, OUT, D)  # H, W, h, w, D
    bn, bd, nw = tp._tiles(D, tp._max_bin_cells(GRID, OUT) ** 2)
    out = []
    for mode, code in tp._MODES.items():
        s = f32 if mode == "weighted" else p  # x stands in for the unused scores
        args = (p, s, p, *grid, code, bn, bd)
        out.append(Variant(f"grid_pool_fwd {mode} D={D}", "tp._grid_pool_fwd_kernel", args, {}, nw))
    args = (p, f32, p, f32, f32, *grid, bn, bd)
    out.append(Variant(f"weighted_bin_stats D={D}", "tp._weighted_bin_stats_kernel", args, {}, nw))
    bc, bd, nw = tp._tiles(D, N, max_cells=64)
    for mode in ("avg", "weighted"):
        w = mode == "weighted"
        s = f32 if w else p  # avg mode passes x for scores, ssum, gdot, grad_s
        args = (p, p, s, s, s, p, s, *grid, D if w else bd, w, bc, bd)
        out.append(Variant(f"grid_pool_bwd {mode} D={D}", "tp._grid_pool_bwd_kernel", args, {}, nw))
    bk, bd, nw = tp._tiles(D, TOPK)
    args = (p, "*i64", p, N, TOPK, D, bk, bd)
    out.append(Variant(f"gather_rows D={D}", "tp._gather_rows_kernel", args, {}, nw))
    return out


def topk_variants() -> list[Variant]:  # scores are float32 whatever x's dtype
    N = GRID * GRID
    bi, nw = tp._launch(N, 64)
    bs, nw2 = tp._launch(N, 1024)
    return [
        Variant("topk_rank", "tp._topk_rank_kernel", ("*fp32", "*i32", N, bi, bi), {}, nw),
        Variant("topk_compact", "tp._topk_compact_kernel", ("*i32", "*i64", N, TOPK, bs), {}, nw2),
    ]


# -------------------------------------------------------------------------- qc_attention


def _strides(*shape: int) -> tuple[int, ...]:
    """Strides of a contiguous tensor of this shape."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def attn_fwd_variants(dt: str, D: int, L: int, T: int = TTXT) -> list[Variant]:
    p, f32 = f"*{dt}", "*fp32"
    bm, bn, bd, nw, ns = qa._fwd_config(L, D, ESIZE[dt])
    q_s, ki_s = _strides(B, L, H, D), _strides(B, NKEYS, HKV, D)
    kt_s = _strides(T, HKV, D) if T else (0, 0, 0)  # T == 0: dummy k_txt/v_txt, strides 0
    lse_s = _strides(B, H, L)
    out = []
    for mass in (False, True):
        # without mass the wrapper passes lse as the (untouched) partial-mass buffer
        m_s = _strides(B, H * triton.cdiv(L, bm), NKEYS) if mass else lse_s
        ptrs = (p, p, p, p, p, "*i32", p, f32, f32)  # Q KI VI KT VT CU O LSE MASS
        scalars = (0.125 * qa._LOG2E, L, NKEYS, H, H // HKV, D)
        strides = (*q_s, *ki_s, *ki_s, *kt_s, *kt_s, *q_s, *lse_s, *m_s)
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, RETURN_MASS=mass, UPCAST=False)
        consts["F32"] = dt == "fp32"
        label = f"qc_fwd mass={int(mass)} D={D} L={L}" + (" T=0" if not T else "")
        kernel = "qa._qc_attn_fwd_kernel"
        out.append(Variant(label, kernel, ptrs + scalars + strides, consts, nw, ns))
    return out


def attn_bwd_variants(dt: str, D: int, T: int = TTXT) -> list[Variant]:
    p, f32, L = f"*{dt}", "*fp32", QUERIES[0]
    block, bd, nw, ns = qa._bwd_config(D, ESIZE[dt])
    q_s, ki_s = _strides(B, L, H, D), _strides(B, NKEYS, HKV, D)
    kt_s = _strides(T, HKV, D) if T else (0, 0, 0)  # T == 0: dummy k_txt/v_txt, strides 0
    lse_s = _strides(B, H, L)
    qk_scale, sm_scale, gm_scale = 0.125 * qa._LOG2E, 0.125, 1.0 / (H * L)
    dims = (L, NKEYS, H, H // HKV, D)
    out = []
    for gm in (False, True):
        gm_s = _strides(B, NKEYS) if gm else (0, 0)  # without grad_mass: lse, strides (0, 0)
        consts = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=bd, HAS_GM=gm, UPCAST=False)
        consts["F32"] = dt == "fp32"
        tag = f"gm={int(gm)} D={D}" + (" T=0" if not T else "")

        ptrs = (p, p, p, p, f32, f32, f32)  # Q KI O DO LSE GM DELTA
        scalars = (qk_scale, gm_scale, *dims)
        strides = (*q_s, *ki_s, *q_s, *q_s, *lse_s, *gm_s)
        kernel = "qa._qc_attn_bwd_preprocess_kernel"
        out.append(Variant(f"qc_bwd_pre {tag}", kernel, ptrs + scalars + strides, consts, nw, ns))

        ptrs = (p, p, p, p, p, "*i32", p, f32, f32, f32, p)  # Q KI VI KT VT CU DO LSE DELTA GM DQ
        scalars = (qk_scale, sm_scale, gm_scale, *dims)
        strides = (*q_s, *ki_s, *ki_s, *kt_s, *kt_s, *q_s, *lse_s, *gm_s)
        kernel = "qa._qc_attn_bwd_dq_kernel"
        out.append(Variant(f"qc_bwd_dq {tag}", kernel, ptrs + scalars + strides, consts, nw, ns))

        ptrs = (p, p, p, "*i32", p, f32, f32, f32, p, p)  # Q K V CU DO LSE DELTA GM DK DV
        segments = [(False, ki_s)] + ([(True, (0, *kt_s))] if T else [])  # txt: batch stride 0
        for txt, ks in segments:
            strides = (*q_s, *ks, *ks, *q_s, *lse_s, *gm_s)
            label = f"qc_bwd_dkdv txt={int(txt)} {tag}"
            kernel = "qa._qc_attn_bwd_dkdv_kernel"
            args = ptrs + scalars + strides
            out.append(Variant(label, kernel, args, dict(consts, IS_TXT=txt), nw, ns))
    return out


def all_variants() -> list[tuple[int, str, Variant]]:
    # The main shapes in every dtype; the secondary ones (head dim 40: same tiles as 64 but
    # unaligned strides; few queries; a small pooling D) only where the code path differs
    # (bf16 takes fp16's tiles and tensor-core path; fp32 the FMA path), to bound the run time.
    per_dtype = []
    for dt in DTYPES:
        extra = dt != "bf16"
        for D in POOL_DIMS[: 2 if extra else 1]:
            per_dtype += [(dt, v) for v in pool_variants(dt, D)]
        for D in HEAD_DIMS[1:] + (HEAD_DIMS[:1] if dt == "fp16" else ()):
            for L in QUERIES[: 2 if extra and D != 40 else 1]:
                per_dtype += [(dt, v) for v in attn_fwd_variants(dt, D, L)]
            per_dtype += [(dt, v) for v in attn_bwd_variants(dt, D)]
    # no question tokens (T == 0): the wrappers pass dummy k_txt/v_txt with strides (0, 0, 0)
    per_dtype += [("fp16", v) for v in attn_fwd_variants("fp16", 64, QUERIES[0], T=0)]
    per_dtype += [("fp16", v) for v in attn_bwd_variants("fp16", 64, T=0)]
    per_dtype += [("-", v) for v in topk_variants()]
    # drop exact duplicates (e.g. the T == 0 kernels that never read the question strides)
    unique: dict = {}
    for dt, v in per_dtype:
        key = (v.kernel, v.args, tuple(v.consts.items()), v.num_warps, v.num_stages)
        unique.setdefault(key, (dt, v))
    return [(arch, dt, v) for arch in ARCHS for dt, v in unique.values()]


# ------------------------------------------------------------------------------ compiling


def _bind(v: Variant):
    """(kernel, {arg name: value}) for the launch ``kernel[grid](*v.args, **v.consts)``."""
    module, name = v.kernel.split(".")
    kernel = getattr({"tp": tp, "qa": qa}[module], name)
    values = dict(zip(kernel.arg_names, v.args, strict=False)) | v.consts
    assert len(v.args) + len(v.consts) == len(kernel.arg_names) == len(values), v.label
    return kernel, values


def _source(kernel, values: dict) -> ASTSource:
    """ASTSource for a launch with these argument values, specialised as Triton's launcher does."""
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        val = values[name]
        if param.is_constexpr:
            sig[name], consts[(i,)] = "constexpr", val
        elif isinstance(val, str):  # pointer
            sig[name], attrs[(i,)] = val, DIV16
        else:  # ints == 1 -> constexpr, ints % 16 == 0 -> divisibility, floats -> fp32
            ty, spec = native_specialize_impl(BaseBackend, val, False, True, True)
            sig[name] = ty
            if ty == "constexpr":
                consts[(i,)] = val
            elif spec == "D":
                attrs[(i,)] = DIV16
    return ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)


def _res_usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers, stack + local bytes per thread) from cuobjdump -res-usage, if available."""
    tool = triton.knobs.nvidia.cuobjdump.path
    if not tool or not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    return (int(m[1]), int(m[2]) + int(m[3])) if m else None


def compile_one(job: tuple[int, str, Variant]) -> tuple[bool, str]:
    arch, dt, v = job
    kernel, values = _bind(v)
    blocks = [f"{k[6:]}{val}" for k, val in values.items() if k.startswith("BLOCK_")]
    cfg = " ".join([*blocks, f"w{v.num_warps}", f"s{v.num_stages}"])
    head = f"sm_{arch} {dt:4} {v.label:34} {cfg:22}"
    t0 = time.perf_counter()
    try:
        cc = triton.compile(
            _source(kernel, values),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=v.num_warps, num_stages=v.num_stages),
        )
    except Exception as e:  # report any compiler error
        msg = " ".join(str(e).split())  # CompilationError: source excerpt, then the error
        msg = msg if len(msg) <= 700 else f"{msg[:150]} ... {msg[-500:]}"
        return False, f"FAIL {head}: {type(e).__name__}: {msg}"
    t = time.perf_counter() - t0
    # Limits the launcher checks on the device: shared memory per block, registers per SM.
    errors, shared, usage = [], cc.metadata.shared, _res_usage(cc.asm["cubin"])
    if shared > MAX_SHARED[arch]:
        errors.append(f"shared memory {shared} > {MAX_SHARED[arch]}")
    regs = "regs=n/a"
    if usage:
        regs = f"regs={usage[0]:>3} local={usage[1]}"
        if usage[0] * 32 * v.num_warps > 65536:
            errors.append(f"{usage[0]} registers x {32 * v.num_warps} threads > 65536")
    line = f"{head} shared={shared:>6} {regs} {t:4.1f}s"
    return (False, f"FAIL {line}: {'; '.join(errors)}") if errors else (True, f"ok   {line}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=len(os.sched_getaffinity(0)))
    n_jobs = ap.parse_args().jobs
    jobs = all_variants()
    t0 = time.perf_counter()
    failed = 0
    # Biggest kernels first so the pool's tail is short.
    order = sorted(jobs, key=lambda j: ("qc_" not in j[2].label, "dkdv" not in j[2].label))
    with ProcessPoolExecutor(max_workers=n_jobs) as pool:
        for ok, line in pool.map(compile_one, order, chunksize=1):
            failed += not ok
            print(line, flush=True)
    dt = time.perf_counter() - t0
    print(f"{len(jobs) - failed}/{len(jobs)} variants compiled ({n_jobs} jobs, {dt:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
