"""Independent measurement of which storages a piece of code leaves alive.

memo reports its own counters (bytes swapped, resident, recomputed); tests and benchmarks need a
second opinion that does not trust them. :func:`track_storages` watches every aten op run inside
it (a ``TorchDispatchMode``), remembers each *new* storage an op returns through a weak
reference only, and later says which of them are still alive::

    with track_storages() as tracker:
        loss = model(input_ids, labels=labels).loss
    tracker.alive_bytes()   # activations the autograd graph (and ``loss``) still hold
    loss.backward(); del loss
    tracker.alive_bytes()   # ~0

NOTE [ What memtrack counts ]
  1. A storage counts if an op run inside the context returned a tensor on it and no tensor
     argument of that op was on it. Views, in-place ops and ``out=`` ops on older tensors therefore
     never count, and storages made before the context (parameters, inputs) are invisible.
  2. Each storage counts once, however many tensors view it, with the largest size an op
     returned it with (``out=`` ops resize). Identity is the storage's ``StorageImpl`` address (``_cdata``); the weak
     reference keeps that address from being reused while it is tracked.
  3. Only weak references are kept (``StorageWeakRef``): tracking never extends a lifetime.
     A storage is alive while anything (a tensor, the autograd graph, a host pool) holds it.
  4. Tensor subclasses (FakeTensor, DTensor) and non-strided or meta tensors are skipped: they
     either have no memory of their own or wrap tensors that are seen separately.
  5. Storages created inside ``with tracker.tag(name):`` carry that tag, and
     :meth:`StorageTracker.mark` re-tags one later -- e.g. host copies made by a saved-tensor pack
     hook, so resident activations and host copies can be told apart on a CPU-only machine.
  6. Only ops run on the thread that entered the context are seen (dispatch modes are
     thread-local); CPU autograd runs backward on the calling thread.
  7. Cost: one Python call per aten op. Keep timed code outside the context.
  8. ``peak_bytes`` is the largest total of tracked storages alive after any op returned (an op's
     outputs are then allocated and its inputs not yet freed, so this is where peaks are).
     Temporaries a kernel makes and frees inside itself are not seen. ``reset_peak()`` starts
     over from the storages alive now.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memo.errors import MemoError

__all__ = ["StorageRecord", "StorageTracker", "track_storages"]

UNTAGGED = ""


@dataclass
class StorageRecord:
    """What is known about one tracked storage (no reference to it)."""

    nbytes: int
    shape: tuple[int, ...]     # of the first tensor seen on the storage
    dtype: torch.dtype
    device: torch.device
    tag: str = UNTAGGED


def _plain_tensors(tree) -> Iterator[torch.Tensor]:
    """Tensors with real strided memory of their own (NOTE [ What memtrack counts ] rule 4)."""
    for t in tree_leaves(tree):
        if (isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter)
                and t.layout == torch.strided and t.device.type != "meta"):
            yield t


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: "StorageTracker") -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage()._cdata for t in _plain_tensors((args, kwargs))}
        out = func(*args, **kwargs)
        self.tracker._observe(out, inputs)
        return out


class StorageTracker:
    """Weak registry of the storages created while its context is active (see the module NOTE)."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[StorageWeakRef, StorageRecord]] = {}
        self._tag = UNTAGGED
        self._mode: Optional[_Mode] = None
        self.created_bytes = 0   # bytes of every storage created inside, alive or not
        self.num_created = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}   # NOTE rule 8: pruned as storages die
        self._live_bytes = 0
        self.peak_bytes = 0

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> "StorageTracker":
        if self._mode is not None:
            raise MemoError("memo.memtrack: this tracker is already active; use a new track_storages()")
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(*exc)

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Storages created inside get tag ``name`` (NOTE [ What memtrack counts ] rule 5)."""
        previous, self._tag = self._tag, name
        try:
            yield
        finally:
            self._tag = previous

    def mark(self, tensor: torch.Tensor, tag: str) -> bool:
        """Re-tag the storage under ``tensor``; False if it is not tracked (made before the context)."""
        entry = self._records.get(tensor.untyped_storage()._cdata)
        if entry is None or entry[0].expired():
            return False
        entry[1].tag = tag
        return True

    # -- recording (called by the dispatch mode) ------------------------------------------------
    def _observe(self, out, input_storages: set[int]) -> None:
        for t in _plain_tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._records.get(key)
            if entry is not None and not entry[0].expired():
                entry[1].nbytes = max(entry[1].nbytes, storage.nbytes())  # resized by an out= op
                continue
            if key in input_storages:
                continue
            nbytes = storage.nbytes()
            ref = StorageWeakRef(storage)
            self._records[key] = (ref, StorageRecord(nbytes, tuple(t.shape), t.dtype, t.device, self._tag))
            self._live[key] = (ref, nbytes)
            self._live_bytes += nbytes
            self.created_bytes += nbytes
            self.num_created += 1
        self._update_peak()

    def _update_peak(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self._live_bytes -= self._live.pop(key)[1]
        self.peak_bytes = max(self.peak_bytes, self._live_bytes)

    def reset_peak(self) -> None:
        """Start the peak over from the tracked storages alive now (NOTE [ What memtrack counts ] rule 8)."""
        self.peak_bytes = 0
        self._update_peak()

    # -- queries -------------------------------------------------------------------------------
    def alive(self, device: Union[str, torch.device, None] = None, *, tags: Optional[Iterable[str]] = None,
              exclude_tags: Iterable[str] = ()) -> list[StorageRecord]:
        """Records of the tracked storages still alive, largest first.

        device: only storages on this device (``"cpu"``, ``"cuda:0"``; ``"cuda"`` matches every
        CUDA device). tags: only these tags (None: any). exclude_tags: drop these tags.
        """
        dev = None if device is None else torch.device(device)
        keep = None if tags is None else set(tags)
        drop = set(exclude_tags)
        out = []
        for ref, rec in self._records.values():
            if ref.expired():
                continue
            if dev is not None and (rec.device.type != dev.type
                                    or (dev.index is not None and rec.device.index != dev.index)):
                continue
            if (keep is not None and rec.tag not in keep) or rec.tag in drop:
                continue
            out.append(rec)
        out.sort(key=lambda r: -r.nbytes)
        return out

    def alive_bytes(self, device: Union[str, torch.device, None] = None, *,
                    tags: Optional[Iterable[str]] = None, exclude_tags: Iterable[str] = ()) -> int:
        """Sum of ``nbytes`` of the tracked storages still alive (filters as in :meth:`alive`)."""
        return sum(r.nbytes for r in self.alive(device, tags=tags, exclude_tags=exclude_tags))

    def summary(self, top: int = 10) -> str:
        """Human-readable list of the largest alive storages, for debugging a failing test."""
        recs = self.alive()
        lines = [f"{len(recs)} alive storages, {sum(r.nbytes for r in recs)} B "
                 f"(created {self.num_created}, {self.created_bytes} B)"]
        lines += [f"  {r.nbytes:>12} B  {str(r.dtype):<15} {list(r.shape)} {r.device} {r.tag}"
                  for r in recs[:top]]
        return "\n".join(lines)


def track_storages() -> StorageTracker:
    """A fresh :class:`StorageTracker`; use it as ``with track_storages() as tracker:``."""
    return StorageTracker()
