"""Builds the compiled extension ``tokengine._C`` from ``csrc/`` (in the way flash-attn does).

C++ CPU ops (OpenMP) are always built when ``csrc/`` has sources; CUDA ops are added when the
installed torch has CUDA and ``nvcc`` is found. Environment switches:
  TOKENGINE_SKIP_EXT=1     build no extension (pure Python + Triton install)
  TOKENGINE_FORCE_CUDA=1   build the CUDA ops even without a visible GPU (needs nvcc)
  TOKENGINE_SKIP_CUDA=1    never build the CUDA ops
  TOKENGINE_CUDA_ARCHS     e.g. "80;90" (default)
Install with ``pip install --no-build-isolation .`` so the build sees the installed torch.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _extensions():
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if _flag("TOKENGINE_SKIP_EXT") or not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 from 2.14).
    cxx = ["-O3", "-fopenmp"]
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    want_cuda = not _flag("TOKENGINE_SKIP_CUDA") and torch.version.cuda is not None and has_nvcc
    want_cuda = want_cuda and (torch.cuda.is_available() or _flag("TOKENGINE_FORCE_CUDA"))
    include = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        archs = os.environ.get("TOKENGINE_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = CUDAExtension(
            "tokengine._C",
            cpp_sources + sorted(glob.glob("csrc/**/*.cu", recursive=True)),
            include_dirs=include,
            define_macros=[("TOKENGINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "tokengine._C",
            cpp_sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
