"""memo's build. `planner/` and `integrations/` install as memo.planner and memo.integrations.

The extension memo._C has a C++ part, always built (host pool, token-slice pack/unpack, arena
replay), and a CUDA part (csrc/cuda/*.cu, csrc/cuda_ops.cpp), built when torch is a CUDA build
and nvcc is found. The build prints which parts it built and why.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# For people with a CUDA torch who want a quick CPU-only build (laptops, CI jobs without a GPU
# toolchain that matches torch's CUDA version).
SKIP_CUDA = os.environ.get("MEMO_SKIP_CUDA_BUILD", "0") == "1"
# For packagers and GPU clusters: build the CUDA part or fail, instead of quietly falling back to
# C++ only when torch or nvcc is not what was expected.
FORCE_CUDA = os.environ.get("MEMO_FORCE_CUDA_BUILD", "0") == "1"


def _say(msg: str) -> None:
    print(f"memo build: {msg}", file=sys.stderr, flush=True)


def _extensions():
    """[memo._C] and the cmdclass that builds it, or ([], {}) when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable in the build environment; building without memo._C "
             "(install torch first, then pip install --no-build-isolation -e .)")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_only = [os.path.join("csrc", "cuda_ops.cpp")]
    cpp = [f for f in cpp if f not in cuda_only]
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    cuda_home = cpp_extension.CUDA_HOME
    if SKIP_CUDA:
        why_not = "MEMO_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU build"
    elif cuda_home is None:
        why_not = f"nvcc not found for torch's CUDA {torch.version.cuda} (set CUDA_HOME)"
    else:
        why_not = None
    if FORCE_CUDA and why_not is not None:
        raise SystemExit(f"memo build: MEMO_FORCE_CUDA_BUILD=1 but the CUDA part cannot be built: {why_not}; "
                         "install a CUDA build of torch and a matching CUDA toolkit, or unset the flag")

    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    common = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=["-fopenmp"])
    if why_not is None:
        ext = cpp_extension.CUDAExtension(
            "memo._C", cpp + cuda_only + cu,
            define_macros=[("MEMO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}, **common)
        _say(f"building memo._C: C++ part ({len(cpp)} files) + CUDA part ({len(cu)} .cu files, "
             f"CUDA {torch.version.cuda}, {cuda_home})")
    else:
        ext = cpp_extension.CppExtension("memo._C", cpp, extra_compile_args={"cxx": cxx}, **common)
        _say(f"building memo._C: C++ part only ({len(cpp)} files); CUDA part skipped: {why_not}")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def _packages():
    """Every package under memo/, planner/ and integrations/, found rather than listed.

    A package missing here is missing from the wheel and from `pip install .` (not from the
    editable install, which reads the source tree), so listing them by hand broke a regular install
    (memo.attention and memo.parallel were left out); tests/test_install.py installs the wheel.
    """
    packages = []
    for name, where in _PACKAGE_DIR.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(where)]
    return packages


# memo's own sources sit in memo/; planner/ and integrations/ install as subpackages of memo.
_PACKAGE_DIR = {"memo": "memo", "memo.planner": "planner", "memo.integrations": "integrations"}

ext_modules, cmdclass = _extensions()

setup(
    name="memo",
    version="0.1.0",
    description="Token-wise activation swapping, ring attention and planned memory for long-context training",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={name: where for name, where in _PACKAGE_DIR.items() if name != where},
    install_requires=["torch>=2.6", "transformers>=4.56", "accelerate", "mip>=1.15", "safetensors", "numpy",
                      "pyyaml"],
    extras_require={
        "flash": ["flash-attn"],
        "deepspeed": ["deepspeed>=0.19"],   # tested: 0.19.8 (ZeRO-3 leaf_module config, the Ulysses mpu)
        "dev": ["pytest", "matplotlib", "ninja"],
    },
    entry_points={"console_scripts": ["memo = memo.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
