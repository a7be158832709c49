"""Every csrc/cuda/*.cu compiles with nvcc for the H200 (sm_90), warning-free, with the half /
bfloat16 restrictions torch's CUDA extensions build with. Needs nvcc, not a GPU."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")

# What torch.utils.cpp_extension passes to nvcc for every CUDA extension.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def compile_cu(source: Path, out_dir: str) -> tuple[Path, subprocess.CompletedProcess]:
    command = [NVCC, "-c", "-std=c++17", "-O2", "-arch=sm_90", *TORCH_NVCC_DEFINES,
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
               "-Xptxas", "-warn-spills,-warn-lmem-usage",
               str(source), "-o", str(Path(out_dir) / f"{source.stem}.o")]
    return source, subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_every_cu_compiles_for_sm90():
    assert {p.name for p in SOURCES} >= {"sparse_decode.cu", "prefill.cu", "summaries.cu",
                                         "select.cu"}
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda source: compile_cu(source, out_dir), SOURCES))
    failures = [f"{source.name}:\n{result.stdout}{result.stderr}"
                for source, result in results if result.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    warnings = [f"{source.name}: {result.stderr}" for source, result in results
                if "warning" in result.stderr.lower()]
    assert not warnings, "nvcc warned:\n" + "\n".join(warnings)


# CUDA library headers that torch's ATen/cuda headers include but only need the handle / status
# types of; an nvcc-only toolkit (as here) lacks them.
LIBRARY_HEADER_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef int cusparseStatus_t;\n"
                  "const char* cusparseGetErrorString(cusparseStatus_t);\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA headers)")
def test_cuda_binding_compiles_against_torch_headers():
    """csrc/cuda/binding.cpp as the CUDA build compiles it (torch's CUDA headers, the CUDA
    runtime), type-checked only: this torch may be CPU-only."""
    import sysconfig

    import torch
    from torch.utils.cpp_extension import include_paths

    from torch.utils.cpp_extension import CUDA_HOME

    roots = [os.environ.get("CUDA_HOME"), CUDA_HOME, Path(NVCC).resolve().parent.parent,
             "/usr/local/cuda"]
    includes = [Path(root) / "include" for root in roots if root]
    cuda_include = next((p for p in includes if (p / "cuda_runtime_api.h").exists()), None)
    assert cuda_include is not None, f"no cuda_runtime_api.h next to nvcc in {includes}"
    torch_include = Path(include_paths()[0])
    if not (torch_include / "ATen" / "cuda" / "CUDAContext.h").exists():
        pytest.fail(f"torch {torch.__version__} ships no ATen/cuda headers in {torch_include}")
    with tempfile.TemporaryDirectory() as stubs:
        for name, text in LIBRARY_HEADER_STUBS.items():
            if (cuda_include / name).exists() or (torch_include / name).exists():
                continue
            path = Path(stubs) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#pragma once\n" + text)
        command = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-Wall",
                   "-Wextra", "-Werror", "-Wno-unused-parameter",
                   "-DTORCH_API_INCLUDE_EXTENSION_H",
                   *[f"-isystem{path}" for path in include_paths()],
                   f"-isystem{sysconfig.get_paths()['include']}", f"-isystem{cuda_include}",
                   f"-isystem{stubs}", str(CUDA_DIR / "binding.cpp")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"binding.cpp does not compile:\n{result.stderr[-6000:]}"
