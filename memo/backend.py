"""Which backends are active, and why the others are not (``memo.backend_info()``)."""

from __future__ import annotations

import torch

from memo import _ext


def backend_info() -> dict:
    """A dict saying which device, copy ops and attention backends memo uses, with reasons.

    ``csrc``: whether ``memo._C`` loaded (``loaded``), is in use (``active``; off under
    ``MEMO_DISABLE_CSRC=1``), has its CUDA part (``cuda_part``), and ``reason`` /
    ``cuda_reason`` when not.
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
    return info
