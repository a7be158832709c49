"""Builds the compiled kernels (strategies/_C) with torch.utils.cpp_extension.

ATTNSERVE_SKIP_EXT=1 installs the Python packages only (the Makefile builds the extension in place
as its own step). ATTNSERVE_SKIP_CUDA=1 skips the CUDA binding even where torch has CUDA.
No -march flag: the CPU kernels pick their instruction set at run time (csrc/cpu/common.h).
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if not os.environ.get("ATTNSERVE_SKIP_EXT"):
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", "-fopenmp"]
    with_cuda = (bool(torch.version.cuda) and not os.environ.get("ATTNSERVE_SKIP_CUDA")
                 and os.path.exists("csrc/cuda/binding.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/binding.cpp"]
        extension = CUDAExtension(
            "strategies._C", sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    else:
        extension = CppExtension("strategies._C", sources, extra_compile_args=cxx_flags,
                                 extra_link_args=["-fopenmp"])
    ext_modules = [extension]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
