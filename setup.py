"""Builds the compiled kernels (strategies/_C) with torch.utils.cpp_extension.

ATTNSERVE_SKIP_EXT=1 installs the Python packages only (the Makefile builds the extension in place
as its own step). ATTNSERVE_SKIP_CUDA=1 skips the CUDA binding even where torch has CUDA.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if not os.environ.get("ATTNSERVE_SKIP_EXT"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = []  # filled in by the kernels work
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
