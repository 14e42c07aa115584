"""Build of adaml_kernels and its compiled extension adaml_kernels._C (csrc/).

    pip install --no-build-isolation -e .          C++ CPU kernel, plus CUDA kernel if nvcc is found
    ADAML_BUILD_EXT=0 pip install ...              no extension (reference and Triton backends only)

The CUDA part is built for TORCH_CUDA_ARCH_LIST, by default "8.0;9.0+PTX" (sm_80, sm_90 and PTX
for newer GPUs). MAX_JOBS caps the parallel compile jobs (read by torch's ninja build). Compiling
needs no GPU.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
SOURCES_CPU = ["csrc/adaml_ops.cpp", "csrc/adaml_fast_path.cpp", "csrc/adaml_module.cpp"]
SOURCES_CUDA = ["csrc/adaml_cuda.cu"]
HEADERS = ["csrc/adaml_update.h", "csrc/adaml_quant8.h"]  # rebuild triggers, and shipped in the sdist

# No floating-point contraction (FMA) in either compiler: the CPU kernel on every instruction set
# and the CUDA kernel then round every operation alike and agree bit for bit. -fno-math-errno and
# -fno-trapping-math change no result; they let GCC vectorize sqrt and the w == 0 select.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _log(msg: str) -> None:
    print(f"adaml_kernels setup: {msg}", file=sys.stderr)


def _is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit directory: nvcc, the runtime headers and the runtime library."""
    if not root:
        return False
    return (
        os.path.isfile(os.path.join(root, "bin", "nvcc"))
        and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        and any(os.path.isdir(os.path.join(root, d)) for d in ("lib64", "lib"))
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with, or None.

    torch guesses CUDA_HOME as the parent of the `bin` holding nvcc, which is wrong where nvcc on
    PATH is a symlink or a wrapper script (e.g. /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc). Order: $CUDA_HOME / $CUDA_PATH, nvcc on PATH (followed through
    symlinks and wrapper scripts), /usr/local/cuda, /usr/local/cuda-*.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return root
            _log(f"${var}={root} is not a CUDA toolkit (no bin/nvcc, include/cuda_runtime.h)")
            return None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.extend(_toolkits_named_in_script(real))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True))
    for root in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root)
    return None


def _toolkits_named_in_script(path: str) -> list[str]:
    """Toolkit directories a small nvcc wrapper script hands over to (".../bin/nvcc")."""
    try:
        if os.path.getsize(path) > 65536:
            return []
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [m.group(1) for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc\b", text)]


def _version_key(path: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _nvcc_threads() -> list[str]:
    """nvcc compiles the GPU architectures in parallel, within the MAX_JOBS budget: the .cpp file
    is the only other compile job."""
    jobs = os.environ.get("MAX_JOBS", "").strip()
    jobs = int(jobs) if jobs.isdigit() and int(jobs) > 0 else (os.cpu_count() or 1)
    return [f"--threads={max(1, min(4, jobs - 1))}"]


def extension_kwargs() -> dict:
    if os.environ.get("ADAML_BUILD_EXT", "1").strip() == "0":
        _log("ADAML_BUILD_EXT=0: not building adaml_kernels._C")
        return {}

    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = False
    if cuda_home is None:
        _log("nvcc not found: building the CPU kernel only")
    elif torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA support: building the CPU kernel only")
    else:
        nvcc_version = _nvcc_version(cuda_home)
        if nvcc_version is None:
            _log(f"cannot run {cuda_home}/bin/nvcc --version: building the CPU kernel only")
        elif nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
            _log(
                f"WARNING: nvcc {nvcc_version} ({cuda_home}) and torch's CUDA "
                f"{torch.version.cuda} differ in major version: building the CPU kernel only"
            )
        else:
            with_cuda = True
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        _log(
            f"building CPU and CUDA kernels with {cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        ext = cpp_extension.CUDAExtension(
            "adaml_kernels._C",
            SOURCES_CPU + SOURCES_CUDA,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + _nvcc_threads()},
            extra_link_args=["-fopenmp"],
            depends=HEADERS,
        )
    else:
        ext = cpp_extension.CppExtension(
            "adaml_kernels._C",
            SOURCES_CPU,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
            depends=HEADERS,
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_kwargs())
