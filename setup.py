"""Builds nasprune._C: the C++ CPU kernels always, the CUDA kernels when torch was built with CUDA
and nvcc is found (decided here from torch.version.cuda, never from torch.cuda.is_available(),
which is false on GPU-less build hosts). The Triton kernels in kernels/ ship as nasprune.kernels.

Environment: CUDA_HOME (the toolkit folder holding bin/nvcc), TORCH_CUDA_ARCH_LIST (default
"8.0;9.0" when unset), MAX_JOBS (parallel compile jobs), NASPRUNE_NO_CUDA=1 (CPU-only build).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def toolkit_home():
    """The CUDA toolkit folder: CUDA_HOME, else the real home of the nvcc on PATH (which may be a
    wrapper script elsewhere; `nvcc --dryrun` prints the toolkit as TOP)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    except OSError:
        return None
    for line in out.splitlines():
        if "TOP=" in line:
            return os.path.realpath(line.split("TOP=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def pip_cuda_includes():
    """Header folders of the pip `nvidia` packages (ATen's CUDA headers include cusparse.h,
    which a bare toolkit may lack)."""
    found = []
    for path in sys.path:
        found += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(p for p in found if os.path.isdir(p)))


def extension():
    import torch

    home = None if os.environ.get("NASPRUNE_NO_CUDA") == "1" else toolkit_home()
    with_cuda = torch.version.cuda is not None and home is not None
    if with_cuda:
        os.environ["CUDA_HOME"] = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # cpp_extension reads CUDA_HOME at import, so import it only after setting it.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without it every CPU
    # kernel runs on one thread. It links the libgomp.so.1 torch already loaded (same soname).
    cxx = ["-O3", "-fopenmp", "-DNASPRUNE_CPU_ONLY" if not with_cuda else "-DNASPRUNE_WITH_CUDA"]
    link = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("nasprune._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link), BuildExtension
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--use_fast_math", "--threads", os.environ.get("NVCC_THREADS", "2")]
    ext = CUDAExtension(
        "nasprune._C",
        sources,
        include_dirs=pip_cuda_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )
    return ext, BuildExtension


ext, build_ext = extension()
setup(
    name="nasprune",
    version="0.1.0",
    description="Compiled-kernel accelerated network pruning by architecture search",
    packages=find_packages(include=["nasprune", "nasprune.*"]) + ["nasprune.kernels"],
    package_dir={"nasprune.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "tqdm", "matplotlib", "pillow", "scikit-learn"],
    extras_require={"triton": ["triton"], "test": ["pytest", "onnx", "onnxruntime", "torchvision"]},
    entry_points={"console_scripts": ["nasprune=nasprune.cli:main"]},
)
