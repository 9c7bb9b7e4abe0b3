"""Shared test setup: Triton under the interpreter on CPU-only machines, backends, tolerances."""

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are defined, so set it before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tokengine import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params(device: torch.device = DEVICE) -> list:
    """Every backend as a pytest param; unusable ones are skipped with the reason."""
    params = []
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, device, torch.float32)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    # The Triton interpreter computes bfloat16 wrongly without an error (DESIGN.md).
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter miscomputes bfloat16; tested on GPU only")


def tolerance(dtype: torch.dtype, terms: int, scale: float) -> float:
    """Allowed absolute error of a result of magnitude ``scale`` made of ``terms``-long sums.

    Fast paths accumulate in float32 and round once to ``dtype``: for 16-bit types that final
    rounding (half an ulp) dominates, so two ulps at ``scale`` is allowed; for float32 the
    accumulation order differs from float64's, whose error grows like sqrt(terms) ulps.
    """
    ulps = 2.0 if dtype != torch.float32 else 4.0 * math.sqrt(terms)
    return ulps * EPS[dtype] * max(scale, 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected.double()).abs()
    assert not torch.isnan(err).any(), f"{what}: NaN in result (unwritten or poisoned output?)"
    assert err.max().item() <= tol, f"{what}: max error {err.max().item():.3e} > tol {tol:.3e}"


@contextlib.contextmanager
def device_sync_forbidden():
    """Inside the block any host-device synchronisation on CUDA raises (a fused op that waits
    for the device stalls the pipeline of every caller)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def skip_unless_fused_on_cuda(backend: str) -> None:
    if DEVICE.type != "cuda" or backend not in ("triton", "cuda"):
        pytest.skip("the fused kernels' promise on CUDA devices")
    reason = backends.unavailable_reason(backend, DEVICE, torch.float16)
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Fill every torch.empty/at::empty allocation with NaN so unwritten outputs fail tests."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


def bench_script(name: str):
    """``bench/<name>.py`` (bench/ is not a package) imported as a module, with bench/ on
    ``sys.path`` as when the script runs, so that it can import the scripts beside it."""
    bench = Path(__file__).parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))
    path = bench / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
