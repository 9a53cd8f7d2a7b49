"""Which backends are active, and why the others are not (``memo.backend_info()``)."""

from __future__ import annotations

import torch

from memo import _ext


def backend_info() -> dict:
    """A dict saying which device, copy ops and attention backends memo uses, with reasons.

    ``csrc``: whether ``memo._C`` loaded (``loaded``), is in use (``active``; off under
    ``MEMO_DISABLE_CSRC=1``), has its CUDA part (``cuda_part``), and ``reason`` /
    ``cuda_reason`` when not. ``accelerate`` / ``deepspeed``: installed versions (read from the
    package metadata, without importing them). ``sp_backends``: each sequence-parallel attention
    backend and whether it can run here. ``packed_documents``: the kernels packed batches (position_ids
    restarting at 0) run on, on the CPU and on CUDA (a varlen kernel where one exists).
    """
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    info = {
        "device": str(accel) if accel is not None else "cpu",
        "streams": ("real copy streams on " + str(accel)) if accel is not None
        else "cpu: torch.Stream/torch.Event are no-ops, copies run synchronously on the same code path",
        "pinned_host_memory": accel is not None,
        "torch": torch.__version__,
        "csrc": _ext.status(),
    }
    try:
        import flash_attn  # noqa: F401
        info["flash_attn"] = "available"
    except ImportError:
        info["flash_attn"] = "not installed (optional extra: pip install 'memo[flash]')"
    info["accelerate"] = _version("accelerate", "not installed (pip install accelerate)")
    info["deepspeed"] = _version("deepspeed", "not installed (optional extra: pip install 'memo[deepspeed]')")
    info["sp_backends"] = _sp_backends(info["flash_attn"])
    from memo.attention.varlen import describe
    info["packed_documents"] = describe()   # NOTE [ Document blocks ] in memo/attention/documents.py
    return info


def _version(package: str, missing: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return missing


def _sp_backends(flash_attn: str) -> dict:
    """ring / ulysses / hybrid run on torch's own attention kernels with LSE wherever torch.distributed exists."""
    import torch.distributed as dist
    if not dist.is_available():
        why = "not available: this torch is built without torch.distributed"
        return {"ring": why, "ulysses": why, "hybrid": why, "flash_attn": flash_attn}
    return {"ring": "available (torch flash kernels with LSE, ring of point-to-point exchanges)",
            "ulysses": "available (all-to-all over attention heads; heads must split over the ranks)",
            "hybrid": "available (Ulysses inside a node, ring across nodes)",
            "flash_attn": flash_attn}
