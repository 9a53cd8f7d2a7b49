"""One decoder layer's token-wise swap and recompute.

A wrapped layer's forward runs under a pack/unpack hook pair owned by one ``LayerState``. Pack
classifies each saved tensor (NOTE [ Saved tensor classes ] in memo/trace.py) and returns the
tensor itself (parameters, shared arguments) or a ``SavedHandle``. When the forward returns, the
saved tensors are grouped by storage into ``SwapRecord``s and their swapped parts copied to the
host pool. At the first unpack in backward the layer is restored: swapped parts copied back,
dropped tokens recomputed by re-running the layer on the token prefix with the attention kernel
replayed from its swapped outputs.

# NOTE [ Layer state machine ]
#
# 1. FORWARD: the layer's forward is running; pack collects tensors.
# 2. SWAPPED: ``finish_forward`` grouped them into records and started their copies out. The
#    device tensors stay referenced until ``release_sources`` (NOTE [ Swap stream ordering ]).
# 3. RESTORED: ``materialize`` brought every record back to the device (prefetched copy in +
#    recomputed prefix). Unpacks return views of the restored buffers.
# 4. DONE: every handle was unpacked once; device buffers and host blocks are released. A second
#    unpack (``retain_graph=True``) is refused with a MemoError.
# 5. From any state, garbage collection of the state (the autograd graph was dropped, e.g. after
#    an exception) returns its host blocks to the pool.

# NOTE [ Layer policies ]
#
# 1. A swapped layer runs one of two policies. "memo" (MEMO's): the layer input and the attention
#    kernel's outputs go to the host whole, the last alpha share of every other token tensor's
#    tokens too, and the rest is recomputed token-wise with attention replayed, never run.
#    "input" (the offloaded checkpoint of ALST/FPDT): only the layer input goes to the host; every
#    other record is dropped, and before the backward the whole layer forward runs again on the
#    restored input, attention included (under sequence parallelism its ring or all-to-all runs
#    again too). Half the host bytes of "memo" at alpha 0, for one more attention forward.
# 2. Which layers run which: a plan's ``layer_policies`` (``MemoConfig(plan=...)``) as given;
#    otherwise "memo" for every swapped layer, except with ``swap_ratio="auto"`` when the host
#    budget cannot hold every swapped layer's input and attention output: then the first k swapped
#    layers run "input", k the least that fits (memo.runtime ``_choose_policies``).
# 3. A budget that cannot hold even every layer's input is refused before the first forward.
# 4. The recompute of an "input" layer is the same computation on the same input as its forward,
#    so it saves the same tensors with the same bits; a layer that draws random numbers has its
#    RNG states restored first (as torch.utils.checkpoint does).
"""

from __future__ import annotations

import contextlib
import enum
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from memo.errors import MemoError
from memo.planned_memory import off_plan
from memo.swap.record import RecordState, SwapRecord, geometry, make_record, view_index
from memo.tiling import restore_rng_states, rng_states
from memo.trace import AttentionKernelMode, Classifier, KERNEL_TOKEN_DIM, LayerCall, LayerTrace, SavedClass, \
    autocast_like, autocast_state, storage_key

if TYPE_CHECKING:
    from memo.runtime import MemoRuntime


POLICIES = ("memo", "input")   # NOTE [ Layer policies ]


class LayerPhase(enum.Enum):
    FORWARD = "forward"
    SWAPPED = "swapped"
    RESTORED = "restored"
    DONE = "done"


_NEXT = {
    LayerPhase.FORWARD: {LayerPhase.SWAPPED},
    LayerPhase.SWAPPED: {LayerPhase.RESTORED},
    LayerPhase.RESTORED: {LayerPhase.DONE},
    LayerPhase.DONE: set(),
}


class SavedHandle:
    """What autograd holds instead of a swapped tensor: the layer state, a storage and a view."""

    __slots__ = ("state", "key", "geom")

    def __init__(self, state: "LayerState", key: int, geom: tuple) -> None:
        self.state = state
        self.key = key
        self.geom = geom


class LayerState:
    """Saved activations of one forward call of one decoder layer."""

    def __init__(self, runtime: "MemoRuntime", index: int, layer: torch.nn.Module,
                 layer_forward: Callable, call: LayerCall, trace: LayerTrace, alpha: float,
                 policy: str = "memo") -> None:
        assert policy in POLICIES, f"memo.executor: unknown layer policy {policy!r} (bug in memo)"
        self.runtime = runtime
        self.index = index
        self.layer = layer
        self.layer_forward = layer_forward
        self.call = call
        self.trace = trace
        self.policy = policy
        # NOTE [ Layer policies ] rule 4: the recompute of an "input" layer draws the forward's random numbers.
        self.rng = rng_states(call.hidden_states.device) if policy == "input" and trace.random_ops else None
        self.tiled = runtime.tiled.get(index)      # NOTE [ Token tiling ] rule 7
        self.mlp_saved_index: Optional[int] = None
        self.mlp_output_unused = False
        self.tile_decision: tuple = (None, False)   # the forward's (tile, fused), NOTE [ Token tiling ] rule 3
        # NOTE [ Which tokens are recomputed ] rule 4: random layers recompute nothing.
        self.alpha = 1.0 if trace.random_ops else alpha
        # Recomputation runs inside backward, where autocast is off: re-enter the forward's.
        self.autocast = autocast_state(call.hidden_states.device.type)
        self.phase = LayerPhase.FORWARD
        self.kernel_mode = AttentionKernelMode()
        self.classify = Classifier(layer, call, self.kernel_mode)
        self.n_packed = 0
        self.groups: dict[int, list] = {}        # storage key -> [(index, tensor)]
        self.records: dict[int, SwapRecord] = {}
        self.input_key = storage_key(call.hidden_states)
        self.input_requires_grad = call.hidden_states.requires_grad   # the recompute saves what the forward saved
        self.kernel_outputs: list = []            # per kernel call: list of (key, geom) or kept objects
        self.d2h_event = None
        self.h2d_event = None
        self.prefetched = False
        self.restore_waited = False
        self.forward_s = 0.0
        self.recompute_s = 0.0
        self.unpacked = 0
        self.handles = 0

    # --- life cycle -----------------------------------------------------------------------
    def to(self, new: LayerPhase) -> None:
        if new not in _NEXT[self.phase]:
            raise AssertionError(f"memo.executor: layer {self.index} {self.phase.value} -> {new.value} (bug in memo)")
        self.phase = new

    # --- forward: pack ---------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        index = self.n_packed
        self.n_packed += 1
        saved = self.trace.saved
        assert index < len(saved) and tuple(t.shape) == saved[index].shape, (
            f"memo.executor: layer {self.index} saved tensor {index} has shape {tuple(t.shape)}, the trace said "
            f"{saved[index].shape if index < len(saved) else 'nothing'} (bug in memo)")
        if self.tiled is not None and self.tiled.saving:
            self.mlp_saved_index = index
        cls = self.classify(t)
        if cls in (SavedClass.PARAM, SavedClass.SHARED):
            return t.detach()   # See NOTE [ Pack returns a detached tensor ] in memo/trace.py
        key = storage_key(t)
        self.groups.setdefault(key, []).append((index, t))
        self.handles += 1
        return SavedHandle(self, key, geometry(t))

    def finish_forward(self) -> None:
        """Group saved tensors into records and start their copies to the host."""
        assert self.n_packed == len(self.trace.saved), (
            f"memo.executor: layer {self.index} saved {self.n_packed} tensors, the trace said "
            f"{len(self.trace.saved)} (bug in memo)")
        if self.tiled is not None:
            self.tile_decision = self.tiled.decision()
        if self.mlp_saved_index is not None:   # NOTE [ Token tiling ] rule 7
            self.mlp_output_unused = all(info.cls in (SavedClass.PARAM, SavedClass.SHARED)
                                         for info in self.trace.saved[self.mlp_saved_index + 1:])
        if self.input_key not in self.groups:
            self.groups[self.input_key] = [(-1, self.call.hidden_states)]
        else:   # the layer input's own geometry first: recomputation slices it
            self.groups[self.input_key].insert(0, (-1, self.call.hidden_states))
        for out in self.kernel_mode.outputs:
            entries = []
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > 0 and storage_key(t) in self.groups:
                    self.groups[storage_key(t)].append((-1, t))
                    entries.append(("saved", storage_key(t), geometry(t)))
                else:   # not saved by autograd: scalars, RNG state, empty tensors; tiny, kept
                    entries.append(("kept", t))
            self.kernel_outputs.append(entries)
        self.kernel_mode.outputs = []
        saved = self.trace.saved
        cfg = self.runtime.config
        for key, members in self.groups.items():
            first = next((i for i, _ in members if i >= 0), -1)
            tensors = [t for _, t in members]
            cls = SavedClass.INPUT if key == self.input_key else (
                self.classify(tensors[0]) if first >= 0 else SavedClass.OTHER)
            layout = saved[first].layout if first >= 0 else None
            rec = make_record(cls, [geometry(t) for t in tensors], tensors[0].dtype, tensors[0].device, layout,
                              self.call.batch, self.call.seq, self.alpha, cfg.offload_torch_dtype,
                              dropped=self.policy == "input" and cls is not SavedClass.INPUT)
            rec.source = tensors[0]
            rec.first_index = first
            rec.handles = sum(1 for i, _ in members if i >= 0)
            self.records[key] = rec
        self.groups = {}
        self.to(LayerPhase.SWAPPED)
        self.runtime.engine.swap_out(self)

    def release_sources(self) -> None:
        """Drop the device tensors of the forward after the compute stream waited for their copies.

        See NOTE [ Swap stream ordering ] rule 2.
        """
        if self.d2h_event is not None and self.call.hidden_states is not None:
            self.runtime.engine.streams.compute.wait_event(self.d2h_event)
        for rec in self.records.values():
            rec.source = None
        self.call.hidden_states = None

    # --- backward: unpack --------------------------------------------------------------------
    def unpack(self, x):
        if not isinstance(x, SavedHandle):
            return x
        if self.phase is LayerPhase.DONE:
            raise MemoError(f"memo.executor: layer {self.index}'s activations were already used by a backward "
                            f"pass and released; memo does not support retain_graph=True or a second backward "
                            f"through a wrapped layer; run one backward per forward")
        if self.phase is LayerPhase.SWAPPED:
            with off_plan(self.runtime.planned_memory):   # NOTE [ Planned memory at run time ] rule 3
                self.materialize()
        rec = self.records[x.key]
        value = rec.view_value(view_index(rec, x.geom))
        rec.unpacks += 1
        self.unpacked += 1
        if rec.unpacks == rec.handles:
            rec.release()
        if self.unpacked == self.handles:
            self.to(LayerPhase.DONE)
            self.runtime.on_layer_done(self)
        return value

    def materialize(self) -> None:
        """Bring the layer back: wait for its prefetch, recompute dropped tokens, prefetch the next."""
        engine = self.runtime.engine
        self.restore_start = time.perf_counter()
        engine.drain()
        if not self.prefetched:
            engine.prefetch(self)
        engine.wait_restored(self)
        self.restore_waited = True
        start = time.perf_counter()
        if self.policy == "input":
            self._recompute_layer()
        else:
            token_records = [r for r in self.records.values() if r.mode == "tokens" and r.split > 0]
            if token_records:
                self._recompute(token_records)
        self.recompute_s = time.perf_counter() - start
        self.to(LayerPhase.RESTORED)
        for rec in self.records.values():
            rec.to(RecordState.RESTORED)
        self.runtime.on_layer_restored(self)

    def _recompute(self, token_records: list[SwapRecord]) -> None:
        split = token_records[0].split
        assert all(r.split == split for r in token_records), "memo.executor: records disagree on split (bug)"
        input_rec = self.records[self.input_key]
        hidden = input_rec.view_value(0).narrow(1, 0, split).contiguous().requires_grad_(self.input_requires_grad)
        kwargs = self.call.sliced_kwargs(split)

        def replay(call_index: int, func, args) -> tuple:
            entries = self.kernel_outputs[call_index]
            outs = []
            for entry in entries:
                if entry[0] == "kept":
                    outs.append(entry[1])
                    continue
                _, key, geom = entry
                rec = self.records[key]
                full = rec.view_value(view_index(rec, geom))
                outs.append(full.narrow(KERNEL_TOKEN_DIM, 0, split).clone()
                            if full.dim() > KERNEL_TOKEN_DIM else full.clone())
            return tuple(outs)

        captured = self._run_capturing(hidden, kwargs, AttentionKernelMode(replay=replay))
        for rec in token_records:
            rec.fill_recomputed(captured[rec.first_index])

    def _recompute_layer(self) -> None:
        """The "input" policy: the whole layer again on its restored input (NOTE [ Layer policies ] rule 1)."""
        input_rec = self.records[self.input_key]
        hidden = input_rec.view_value(0).detach().requires_grad_(self.input_requires_grad)
        captured = self._run_capturing(hidden, self.call.sliced_kwargs(self.call.seq), AttentionKernelMode())
        for rec in self.records.values():
            if rec.dropped:
                rec.fill_dropped(captured[rec.first_index])

    def _run_capturing(self, hidden: torch.Tensor, kwargs: dict, kernel_mode: AttentionKernelMode) -> list:
        """Run the layer forward again; every tensor it saves, in order (detached)."""
        captured: list[torch.Tensor] = []

        def capture(t):
            captured.append(t.detach())
            return captured[-1]

        with contextlib.ExitStack() as stack:
            if self.rng is not None:
                restore_rng_states(stack, self.rng, hidden.device)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast_like(self.autocast))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(capture, lambda t: t))
            stack.enter_context(kernel_mode)
            if self.tiled is not None:
                stack.enter_context(self.tiled.replaying(self.tile_decision, self.mlp_output_unused))
            self.layer_forward(hidden, *self.call.args, **kwargs)
        if len(captured) != len(self.trace.saved):
            raise AssertionError(f"memo.executor: recomputing layer {self.index} saved {len(captured)} tensors, "
                                 f"the forward saved {len(self.trace.saved)} (bug in memo)")
        return captured

    # --- accounting -----------------------------------------------------------------------
    def host_bytes(self) -> int:
        return sum(r.host_bytes() for r in self.records.values())

    def recomputed_bytes(self) -> int:
        return sum(r.recomputed_bytes() for r in self.records.values() if r.mode == "tokens" or r.dropped)

    def activation_bytes(self) -> int:
        return sum(r.bytes() for r in self.records.values())

    def __del__(self) -> None:
        # NOTE [ Layer state machine ] rule 5: the graph is gone; give the host blocks back.
        if getattr(self, "d2h_event", None) is not None:
            self.release_sources()
        if getattr(self, "prefetched", False) and not self.restore_waited:
            # prefetched but never used (backward stopped early): the H2D copy may still be writing
            # into buffers the allocator would hand to the compute stream (NOTE [ Swap stream ordering ] 3)
            self.runtime.engine.streams.compute.wait_event(self.h2d_event)
        for rec in getattr(self, "records", {}).values():
            rec.free_host()


def plan_layer_records(trace: LayerTrace, alpha: float, device: torch.device,
                       host_dtype: Optional[torch.dtype], policy: str = "memo") -> list[SwapRecord]:
    """The records a layer call will make, from its trace alone (for sizing before any forward)."""
    groups: dict[int, list] = {}
    classes: dict[int, SavedClass] = {}
    for info in trace.saved:
        if info.cls in (SavedClass.PARAM, SavedClass.SHARED):
            continue
        groups.setdefault(info.group, []).append((info.shape, info.stride, info.offset))
        classes[info.group] = info.cls
    for group, geoms in trace.kernel_views.items():
        if group in groups:
            groups[group].extend(geoms)
    if trace.random_ops:
        alpha = 1.0   # NOTE [ Which tokens are recomputed ] rule 4
    records = []
    has_input = any(c is SavedClass.INPUT for c in classes.values())
    for group, geoms in groups.items():
        info = trace.saved[group]
        records.append(make_record(classes[group], geoms, info.dtype, device, info.layout, trace.batch, trace.seq,
                                   alpha, host_dtype,
                                   dropped=policy == "input" and classes[group] is not SavedClass.INPUT))
    if not has_input:
        shape = trace.hidden_shape
        stride = (shape[1] * shape[2], shape[2], 1)
        records.append(make_record(SavedClass.INPUT, [(shape, stride, 0)], trace.hidden_dtype, device, None,
                                   trace.batch, trace.seq, alpha, host_dtype))
    return records
