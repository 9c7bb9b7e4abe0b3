"""Backend selection: forced backends, the environment variable, defaults, and the info CLI."""

import subprocess
import sys

import pytest
import torch

from tokengine import backends
from tokengine.backends import BackendUnavailableError
from tokengine.ops import token_pool

X = torch.randn(1, 16, 4)


def test_forced_unavailable_backend_raises_never_falls_back():
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is unavailable"):
        token_pool(X, 4, backend="cuda")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select(None, torch.device("cpu"), torch.float32, "token_pool") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="TOKENGINE_BACKEND='cuda'"):
        token_pool(X, 4)
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        token_pool(X, 4)


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert token_pool(X, 4, backend="reference").shape == (1, 4, 4)


def test_default_on_cpu_is_the_compiled_backend_when_built():
    expected = (
        "cpp"
        if backends.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None
        else "reference"
    )
    for op in backends.OPS:
        assert backends.select(None, torch.device("cpu"), torch.float32, op) == expected
        # float64 is the reference's alone
        assert backends.select(None, torch.device("cpu"), torch.float64, op) == "reference"
    with pytest.raises(BackendUnavailableError, match="float64"):
        backends.select("triton", torch.device("cpu"), torch.float64, "token_pool")
    with pytest.raises(ValueError, match="op must be one of"):
        backends.select(None, torch.device("cpu"), torch.float32, "conv")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_info_cli_lists_every_backend():
    result = subprocess.run(
        [sys.executable, "-m", "tokengine.info"], capture_output=True, text=True, check=True
    )
    for name in backends.BACKENDS:
        assert name in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "tokengine.info", "--require", "cuda"],
        capture_output=True,
        text=True,
    )
    cuda_usable = torch.cuda.is_available() and backends.status("cuda")["cuda"] is None
    assert missing.returncode == (0 if cuda_usable else 1)
