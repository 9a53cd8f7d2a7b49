"""Loading the C++ extension ``memo._C``, and why it is or is not in use.

``csrc()`` is what the ops and the host pool ask before each use: the module when it loaded and
``MEMO_DISABLE_CSRC`` is not ``1``, else ``None`` (the pure-torch fallbacks run). The variable is
read on every call, so tests can flip it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

DISABLE_ENV = "MEMO_DISABLE_CSRC"

_module: ModuleType | None = None
_load_error: str | None = None


def _load() -> None:
    global _module, _load_error
    try:
        _module = importlib.import_module("memo._C")
    except ImportError as e:  # not built (pure-Python install) or built against another torch
        _load_error = (f"memo._C did not load ({e}); rebuild with "
                       "`pip install --no-build-isolation -e .` in an environment with torch installed")


_load()


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") == "1"


def csrc() -> ModuleType | None:
    """``memo._C`` if it is loaded and not disabled, else ``None``."""
    return None if _module is None or disabled() else _module


def cuda_part() -> bool:
    """Whether the loaded ``memo._C`` has its CUDA kernels (and page-locking) compiled in."""
    return _module is not None and bool(_module.has_cuda_part)


def status() -> dict:
    """The ``csrc`` entry of :func:`memo.backend_info`."""
    info = {"loaded": _module is not None, "active": csrc() is not None, "cuda_part": cuda_part()}
    if _module is None:
        info["reason"] = _load_error
    elif disabled():
        info["reason"] = f"{DISABLE_ENV}=1: the pure-torch fallbacks of memo/ops.py and memo/swap/host_pool.py run"
    if _module is not None and not cuda_part():
        info["cuda_reason"] = ("memo._C was built without its CUDA part (CPU build of torch, no nvcc, or "
                               "MEMO_SKIP_CUDA_BUILD=1); CUDA tensors use the pure-torch copies")
    if _module is not None:
        info["path"] = _module.__file__
    return info
