"""``python -m tokengine.info``: versions, devices, and which backends can run and why not.

``--require NAME[,NAME]`` exits non-zero unless those backends are usable on the CPU (or on
CUDA for ``cuda``): CI uses it so that a failed extension build cannot pass as skipped tests.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from tokengine import __version__, backends


def report() -> tuple[str, dict[str, dict[str, str | None]]]:
    """The report text and {device: {backend: reason or None}}."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {d: backends.status(d) for d in devices}
    triton = backends._import("triton")
    lines = [
        f"tokengine {__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f"  triton {getattr(triton, '__version__', 'not installed')}",
        f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
    ]
    isas = backends.cpp_kernel_isas()
    if isas:
        lines.append(
            f"cpp attention kernels: {backends._compiled().cpu_isa()} (this CPU runs "
            f"{', '.join(isas)}; TOKENGINE_CPU_ISA picks one)"
        )
    for device, status in table.items():
        defaults = ", ".join(
            f"{op} {backends.select(None, torch.device(device), torch.float32, op)}"
            for op in backends.OPS
        )
        lines.append(f"backends on {device} (defaults for float32: {defaults}):")
        for name, reason in status.items():
            lines.append(f"  {name:<10} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines), table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokengine.info", description=__doc__)
    parser.add_argument("--require", default="", help="comma-separated backends that must work")
    args = parser.parse_args(argv)
    text, table = report()
    print(text)
    missing = []
    for name in filter(None, args.require.split(",")):
        device = "cuda" if name == "cuda" else "cpu"
        reason = table.get(device, {}).get(name, f"no {device} device")
        if reason is not None:
            missing.append(f"{name}: {reason}")
    if missing:
        print("required backends unavailable:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
