"""Builds mtl_kernels._C from csrc/.

CPU kernels always (with OpenMP, so at::parallel_for runs in parallel); CUDA
kernels by MTL_KERNELS_CUDA:
  auto (default)  when torch has CUDA and nvcc is found
  1               always (a CUDA build on a machine with no GPU; fails if impossible)
  0               never
With no C++ compiler the package installs without _C and runs on the
reference and Triton backends (it says so once at import).
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

# torch guesses CUDA_HOME from the first nvcc on PATH; a wrapper in
# /usr/local/bin makes it guess /usr/local, where libcudart is missing.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("MTL_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MTL_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    # CUDA_HOME may be set (the Makefile's default) where no toolkit is: auto needs nvcc there.
    home = cpp_extension.CUDA_HOME
    possible = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if mode == "1" and not possible:
        sys.exit(
            "MTL_KERNELS_CUDA=1 but a CUDA build is impossible here: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return mode == "1" or (mode == "auto" and possible)


def cxx_command() -> str:
    return (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]


def have_compiler() -> bool:
    return shutil.which(cxx_command()) is not None


def is_gcc() -> bool:
    try:
        out = subprocess.run([cxx_command(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return False
    return "clang" not in out.lower()


def extensions():
    if not have_compiler():
        print("mtl_kernels: no C++ compiler found; installing without compiled kernels", file=sys.stderr)
        return []
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch picks the C++ standard it needs. -fno-trapping-math lets float compares and selects
    # (clamps, ReLU masks) be if-converted, so those loops vectorise; nothing here reads FP exceptions.
    # -fno-math-errno: sqrt becomes one instruction, not a call that may set errno (which nothing
    # here reads); with the call, the normals loss loop did not vectorise and ran 20x slower.
    # -fno-thread-jumps: GCC 12 threads jumps through exp's range clamp, which leaves the vectorised
    # sigmoid with a blend per region; gate_sum's backward row ran 1.7x slower per element with it
    # (a GCC flag: left out for clang).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    cxx_flags += ["-fno-thread-jumps"] if is_gcc() else []
    if not want_cuda():
        return [
            cpp_extension.CppExtension(
                "mtl_kernels._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    # The CUDA wheels ship cuBLAS/cuSPARSE headers that ATen's CUDA headers
    # include; a toolkit without them (as on a GPU-less build machine) needs these.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return [
        cpp_extension.CUDAExtension(
            "mtl_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)
