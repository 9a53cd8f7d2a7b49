"""memo: token-wise activation swapping, ring attention and planned memory for HF models."""

from memo.backend import backend_info
from memo.config import MemoConfig
from memo.errors import MemoError

__all__ = ["MemoConfig", "MemoError", "backend_info"]
__version__ = "0.1.0"

from memo.wrap import stats, unwrap, wrap  # noqa: E402

__all__ += ["wrap", "unwrap", "stats"]
