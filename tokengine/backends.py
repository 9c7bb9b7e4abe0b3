"""Backend registry: which implementations exist, which are usable for given tensors, and why not.

Every op has four implementations with one contract (``docs/BACKEND_CONTRACT.md``):
``reference`` (plain PyTorch, the spec), ``triton`` (``tokengine.kernels``), ``cpp`` and
``cuda`` (the compiled extension ``tokengine._C``, on CPU and CUDA tensors respectively).
A backend that is asked for but unusable raises :class:`BackendUnavailableError`; nothing
ever falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENV_VAR = "TOKENGINE_BACKEND"

OPS = ("token_pool", "qc_attention")
# Default preference per (device type, op): the fastest measured first. On an H100
# (bench/results/gpu-h100-2026-11-26.md) the CUDA pooling kernels ran 8-15x faster than
# Triton's, while Triton's attention ran 14-16x faster than the CUDA one (bf16, the fusion
# module's shapes); on CPUs the fused C++ ops beat the reference for both.
_PREFERENCE = {
    ("cuda", "token_pool"): ("cuda", "triton", "reference"),
    ("cuda", "qc_attention"): ("triton", "cuda", "reference"),
    ("cpu", "token_pool"): ("cpp", "reference"),
    ("cpu", "qc_attention"): ("cpp", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested (argument or ``TOKENGINE_BACKEND``) but cannot run these inputs."""


@functools.cache
def _import(name: str) -> ModuleType | str:
    """The module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return f"{type(exc).__name__}: {exc}"


def _compiled() -> ModuleType | str:
    mod = _import("tokengine._C")
    if isinstance(mod, str):
        return (
            f"extension tokengine._C is not importable ({mod}); reinstall with "
            "`pip install --no-build-isolation .` to build it"
        )
    return mod


def cpp_kernel_isas() -> list[str]:
    """Instruction sets of the C++ attention kernels this CPU runs, narrowest first (empty
    without ``tokengine._C``); ``TOKENGINE_CPU_ISA`` picks one, the widest by default."""
    mod = _compiled()
    return [] if isinstance(mod, str) else list(mod.cpu_isas())


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run tensors of ``dtype`` on ``device``, else the reason why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "reference":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"{backend} supports {[str(d) for d in KERNEL_DTYPES]}, not {dtype}"
    if backend == "triton":
        mod = _import("triton")
        if isinstance(mod, str):
            return f"triton is not importable ({mod})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreted():
            return None
        return f"triton runs on CUDA devices, or on the CPU with TRITON_INTERPRET=1 (got {device})"
    compiled = _compiled()
    if isinstance(compiled, str):
        return compiled
    if backend == "cpp":
        return None if device.type == "cpu" else f"cpp runs on CPU tensors (got {device})"
    # cuda
    if not compiled.with_cuda():
        return "tokengine._C was built without CUDA ops (no CUDA torch or nvcc at build time)"
    return None if device.type == "cuda" else f"cuda runs on CUDA tensors (got {device})"


def select(requested: str | None, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The backend to run ``op`` (one of ``OPS``): ``requested``, else ``$TOKENGINE_BACKEND``,
    else the fastest usable for the device."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    forced = requested if requested is not None else os.environ.get(ENV_VAR) or None
    if forced is not None:
        reason = unavailable_reason(forced, device, dtype)
        if reason is not None:
            source = "backend" if requested is not None else ENV_VAR
            raise BackendUnavailableError(f"{source}={forced!r} is unavailable: {reason}")
        return forced
    for name in _PREFERENCE.get((device.type, op), ("reference",)):
        if unavailable_reason(name, device, dtype) is None:
            return name
    return "reference"


def implementation(backend: str, op: str) -> ModuleType:
    """The module exposing ``op``'s contract functions for a non-reference ``backend``.

    ``op`` is ``"token_pool"`` or ``"qc_attention"``.
    """
    if backend == "triton":
        return importlib.import_module(f"tokengine.kernels.{op}")
    return _compiled()


def status(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend: None if usable for float32 tensors on ``device``, else why not."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device, torch.float32) for name in BACKENDS}
