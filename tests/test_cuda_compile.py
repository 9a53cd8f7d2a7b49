"""The code only a GPU runs must at least compile here (README: "Code that only a GPU runs").

1. Every csrc/cuda/*.cu compiles with nvcc as C++20 (the standard torch builds extensions
   with), using the CUDA runtime API only and no torch headers, and the objects export the
   pluggable-allocator entry points with C linkage.
2. csrc/cuda_ops.cpp, the CUDA binding built only in CUDA builds, passes a C++ syntax check
   against the CUDA headers that ship in torch's wheel (plus the toolkit's), so a typo there
   does not wait for a GPU machine to show up.
Skipped, with the reason, only when the tool is absent. All compilers start at once (a
module fixture) so the two checks overlap.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
GXX = shutil.which("g++")
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _cuda_include():
    """The toolkit's include directory: $CUDA_HOME, nvcc's own tree, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))),
                  "/usr/local/cuda"]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def _popen(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """{"nvcc": {cu: (obj, process)}, "binding": process or a skip reason}, all started at once."""
    jobs = {"nvcc": {}, "binding": None}
    if NVCC is None:
        return jobs
    out_dir = os.path.join(ROOT, "build", "cuda")
    os.makedirs(out_dir, exist_ok=True)
    for cu in CU_FILES:
        obj = os.path.join(out_dir, os.path.basename(cu)[:-3] + ".o")
        jobs["nvcc"][cu] = (obj, _popen([NVCC, "-std=c++20", "-O3", "-Xcompiler", "-Wall", "-c", cu, "-o", obj]))
    cuda_inc = _cuda_include()
    if GXX is None or cuda_inc is None:
        jobs["binding"] = "needs g++ and the CUDA toolkit's headers (set CUDA_HOME)"
        return jobs
    shim_root = tmp_path_factory.mktemp("shim")
    # CPU wheels ship c10/cuda headers but not the generated cmake-macros one; CUDA builds have it.
    shim = shim_root / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    jobs["binding"] = _popen([
        GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-function", "-DMEMO_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{shim_root}",
        f"-I{os.path.join(ROOT, 'csrc')}", f"-I{torch_inc}",
        f"-I{os.path.join(torch_inc, 'torch', 'csrc', 'api', 'include')}", f"-I{cuda_inc}",
        f"-I{sysconfig.get_paths()['include']}", os.path.join(ROOT, "csrc", "cuda_ops.cpp")])
    yield jobs
    for _, p in jobs["nvcc"].values():
        p.kill() if p.poll() is None else None
    if isinstance(jobs["binding"], subprocess.Popen) and jobs["binding"].poll() is None:
        jobs["binding"].kill()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the .cu files are compiled where a CUDA toolkit exists")
def test_every_cu_file_compiles_with_nvcc(compiles):
    assert CU_FILES, "no csrc/cuda/*.cu files found"
    failed = {}
    for cu, (obj, p) in compiles["nvcc"].items():
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            failed[os.path.relpath(cu, ROOT)] = out
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {k}\n{v}" for k, v in failed.items())
    nm = shutil.which("nm")
    if nm is not None:
        objs = [obj for obj, _ in compiles["nvcc"].values()]
        syms = subprocess.run([nm, "-g", "--defined-only"] + objs, capture_output=True, text=True,
                              check=True).stdout.split()
        for name in ["memo_arena_alloc", "memo_arena_free", "memo_arena_configure", "memo_arena_begin_phase"]:
            assert name in syms, f"{name} is not exported with C linkage"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA toolkit headers to check the binding against")
def test_cuda_binding_passes_syntax_check(compiles):
    job = compiles["binding"]
    if isinstance(job, str):
        pytest.skip(job)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-4000:]
