"""Benchmark setup: device, backends as parameters, and a helper that records µs and GB/s."""

import pytest
import torch

from tokengine import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params() -> list:
    """Every tokengine backend; the Triton interpreter on CPU is skipped as too slow to time."""
    params = []
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, DEVICE, torch.float32)
        if name == "triton" and DEVICE.type == "cpu":
            reason = "Triton on CPU runs only in its interpreter, far too slow to benchmark"
        params.append(
            pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)
        )
    return params


def run(benchmark, fn, nbytes: int, **info) -> None:
    """Time ``fn`` (synchronising CUDA) and record µs and GB/s in the benchmark's extra_info."""

    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(call)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = (
        torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    )
    benchmark.extra_info["us"] = round(mean * 1e6, 1)
    if nbytes:  # 0: no meaningful byte count (end-to-end generation)
        benchmark.extra_info["GB/s"] = round(nbytes / mean / 1e9, 2)


def pytest_terminal_summary(terminalreporter, config):
    """One compact table: per group, each entry's µs, GB/s and speed relative to the baseline."""
    session = getattr(config, "_benchmarksession", None)
    results = [b for b in getattr(session, "benchmarks", []) if b.extra_info.get("us")]
    if not results:
        return
    write = terminalreporter.write_line
    write("")
    write(f"{'group / entry':<78} {'µs':>12} {'GB/s':>8} {'vs baseline':>11}")
    for group in sorted({b.group for b in results}):
        members = [b for b in results if b.group == group]
        base = [b.extra_info["us"] for b in members if "baseline" in b.name]
        write(group)
        for b in sorted(members, key=lambda b: b.extra_info["us"]):
            speedup = f"{base[0] / b.extra_info['us']:.2f}x" if base else ""
            name = b.name.removeprefix("test_")
            gbs = b.extra_info.get("GB/s")
            gbs = f"{gbs:>8.2f}" if gbs is not None else " " * 8
            write(f"  {name:<76} {b.extra_info['us']:>12.1f} {gbs} {speedup:>11}")
