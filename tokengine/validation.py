"""Input checks for the public ops: every error names the argument and what was expected."""

from __future__ import annotations

import argparse
import math

import torch

from tokengine.reference import pool_output_grid, valid_token_counts

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
POOL_MODES = ("avg", "max", "weighted", "topk")
MAX_HEAD_DIM = 256


def tensor(name: str, value: object, rank: int, shape_doc: str) -> torch.Tensor:
    """``value`` must be a floating tensor of ``rank`` dims (shape documented as ``shape_doc``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(value)}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    return value


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def same(kind: str, names: list[str], tensors: list[torch.Tensor]) -> None:
    """All ``tensors`` share their device (kind="device") or dtype (kind="dtype")."""
    values = [getattr(t, kind) for t in tensors]
    if any(v != values[0] for v in values):
        listing = ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
        error = TypeError if kind == "dtype" else ValueError
        raise error(f"{', '.join(names)} must share one {kind}, got {listing}")


def pool_grid(grid: object, n: int) -> tuple[int, int]:
    """The (H, W) grid of ``n`` tokens: ``grid`` if given, else the square one."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"x has N={n} tokens, which is not a square grid; pass grid=(H, W) with H*W={n}"
            )
        return side, side
    if (
        not isinstance(grid, tuple | list)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"grid must be a pair of ints (H, W), got {grid!r}")
    H, W = grid
    if H < 1 or W < 1 or H * W != n:
        raise ValueError(f"grid must be (H, W) with H, W >= 1 and H*W = N = {n}, got {grid!r}")
    return H, W


def pool_tokens(tokens: int, grid: tuple[int, int], mode: str, n: int) -> None:
    """``tokens`` must be a reachable N_l for ``mode`` on ``grid``."""
    if mode == "topk":
        if tokens > n:
            raise ValueError(f"tokens must be <= N = {n} for mode='topk', got {tokens}")
        return
    h, w = pool_output_grid(tokens)
    if h > grid[0] or w > grid[1]:
        valid = valid_token_counts(grid)
        raise ValueError(
            f"tokens={tokens} needs a {h}x{w} output grid, which does not fit the "
            f"{grid[0]}x{grid[1]} input grid; valid tokens for this grid: {valid}"
        )


def pool_scores(scores: object, x: torch.Tensor, mode: str) -> torch.Tensor | None:
    B, N, _ = x.shape
    if mode in ("avg", "max"):
        if scores is not None:
            raise ValueError(f"scores is only used by mode='weighted' or 'topk', not {mode!r}")
        return None
    if scores is None:
        raise ValueError(f"mode={mode!r} needs scores of shape (B, N) = ({B}, {N})")
    tensor("scores", scores, 2, f"(B, N) = ({B}, {N})")
    if tuple(scores.shape) != (B, N):
        raise ValueError(f"scores must have shape (B, N) = ({B}, {N}), got {tuple(scores.shape)}")
    same("device", ["x", "scores"], [x, scores])
    if scores.device.type != "cpu":
        return scores  # reading values back would synchronise the device (see cu_seqlens)
    if torch.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    if mode == "weighted" and ((scores < 0).any() or torch.isinf(scores).any()):
        raise ValueError("scores must be finite and >= 0 for mode='weighted'")
    return scores


def cu_seqlens(cu: object, batch: int, total: int, device: torch.device) -> torch.Tensor:
    """Packed offsets: int32 (B+1,), starting at 0, non-decreasing, ending at T."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(
            f"cu_seqlens_txt must be an int32 torch.Tensor of shape (B+1,) = "
            f"({batch + 1},), got {type(cu)}"
        )
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens_txt must have dtype torch.int32, got {cu.dtype}")
    if tuple(cu.shape) != (batch + 1,):
        raise ValueError(
            f"cu_seqlens_txt must have shape (B+1,) = ({batch + 1},), got {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise ValueError(f"cu_seqlens_txt must be on {device}, got {cu.device}")
    if cu.device.type != "cpu":
        # Reading the offsets back would make every call wait for the device (measured on an
        # H100: it cost as much as the fused kernel itself). As in flash-attn, values are the
        # caller's duty on GPUs; on CPU tensors they are checked, which is free there.
        return cu
    host = cu.tolist()
    if host[0] != 0:
        raise ValueError(f"cu_seqlens_txt must start at 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:], strict=False)):
        raise ValueError(f"cu_seqlens_txt must be non-decreasing (negative lengths), got {host}")
    if host[-1] != total:
        raise ValueError(
            f"cu_seqlens_txt must end at the packed length T = {total} of k_txt, got {host[-1]}"
        )
    return cu


def softmax_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise TypeError(f"softmax_scale must be a finite float or None, got {scale!r}")
    return float(scale)


def device_arg(text: str) -> str:
    """argparse ``type=`` of the CLIs' ``--device``: ``cpu`` or ``cuda[:i]`` that this torch
    can use, else a usage error that says why (instead of a traceback from deep in a run)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:INDEX, got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    return text


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The CLIs' ``--device`` (checked by :func:`device_arg`); ``default`` None means ``cuda``
    when this torch sees a GPU, else ``cpu``."""
    if default is None:
        default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device",
        type=device_arg,
        default=default,
        help="cpu, cuda or cuda:INDEX; default %(default)s",
    )
