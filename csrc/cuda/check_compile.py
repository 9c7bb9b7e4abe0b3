"""Compile-check every ``csrc/**/*.cu`` with nvcc (no GPU needed, nothing is linked or run).

Each file is compiled with ``nvcc -c`` for sm_80 and sm_90 with the flags that ``setup.py`` and
``torch.utils.cpp_extension`` use for the real build, into a temporary directory. Prints one
line per file and exits non-zero if any file fails (or nvcc / torch is missing).

A CPU-only torch wheel ships the c10/ATen CUDA headers but not the generated
``c10/cuda/impl/cuda_cmake_macros.h``; when that file is absent we define
``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` (the switch c10/cuda/CUDAMacros.h provides for builds
without it), which only affects the export macros on Windows.

Usage: python csrc/cuda/check_compile.py [-j JOBS] [--verbose] [FILE.cu ...]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def cuda_include_dir(nvcc: str) -> str:
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.path.join(home, "include")


def nvcc_flags(nvcc: str) -> list[str]:
    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths()]
    cuda_inc = cuda_include_dir(nvcc)
    if os.path.isdir(cuda_inc):
        includes.append(cuda_inc)
    includes.append(sysconfig.get_paths()["include"])

    flags = ["-c", "-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DTOKENGINE_WITH_CUDA"]
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    flags += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    flags += ["--compiler-options", "-fPIC", "-diag-suppress=3306"]  # 3306: torch's C++20 bits
    for arch in ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    torch_inc = cpp_extension.include_paths()[0]
    if not os.path.isfile(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags += [f"-I{p}" for p in includes]
    return flags


def compile_one(nvcc: str, flags: list[str], src: str, outdir: str) -> tuple[str, bool, float, str]:
    obj = os.path.join(outdir, os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
    start = time.monotonic()
    proc = subprocess.run(
        [nvcc, *flags, src, "-o", obj], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return src, proc.returncode == 0, time.monotonic() - start, proc.stdout + proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="sources (default: every csrc/**/*.cu)")
    parser.add_argument("-j", "--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--verbose", action="store_true", help="print nvcc output of passes too")
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("FAIL: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 2
    try:
        flags = nvcc_flags(nvcc)
    except ImportError as exc:
        print(f"FAIL: torch is needed for its include paths: {exc}")
        return 2

    sources = args.files or sorted(
        glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    )
    if not sources:
        print("FAIL: no .cu files under csrc/")
        return 1
    print(f"nvcc: {nvcc}; {len(sources)} file(s); archs sm_{', sm_'.join(ARCHS)}; jobs {args.jobs}")

    failed = 0
    with tempfile.TemporaryDirectory(prefix="tokengine_cu_") as outdir:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(compile_one, nvcc, flags, s, outdir) for s in sources]
            for fut in futures:
                src, ok, secs, log = fut.result()
                rel = os.path.relpath(src, ROOT)
                print(f"{'ok  ' if ok else 'FAIL'} {rel} ({secs:.1f}s)", flush=True)
                if not ok:
                    failed += 1
                if log.strip() and (not ok or args.verbose):
                    print(log.rstrip())
    print(f"{len(sources) - failed}/{len(sources)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
