"""The planner's Level-1 peaks of a decoder layer against the live bytes of a real run of it.

memo.profile records a layer's allocations under FakeTensorMode with its own recorder
(``AllocationRecorder``), and ``memo.planner`` places them (``solve_level1``). Here a real fp32
layer runs on the CPU under ``_LiveBytes``, a separate dispatch mode that shares no code with the
recorder: it holds a weak reference to every storage an op creates and, after each op, adds up
the bytes of those still alive. From that:

* ``test_level1_peaks_match_a_measured_layer_run``: the planner's forward and backward peaks lie
  within ``PEAK_TOLERANCE`` above the measured peaks (never below: a plan below the real peak
  runs out of memory);
* ``test_profiled_live_bytes_equal_the_measured_ones_at_every_step``: the profile's live bytes
  equal the measured ones op by op. The peaks alone cannot see a recorder that frees tensors a
  few steps late (a layer's forward peaks at its end, when everything it saves is live anyway,
  and its backward peaks before the big saved tensors are released); the whole timeline can.

What is counted on both sides (NOTE [ Profiler allocation steps ] in memo/profile.py):
  1. Steps are aten ops (``prim`` ops excluded); live "at step k" means alive while op k runs.
  2. Parameters, buffers and RoPE's cos/sin are not allocations of the layer. The layer input is
     live from step 0.
  3. Backward: what the forward left alive (the saved activations) is live at step 0; parameter
     gradients are model states and are left out; so is the layer's output, which in a model is
     the next layer's input and charged there. The input stays live: here it is a leaf, and every
     family below saves it (its first norm's input), as in a model.
"""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memo.planner.layout import live_bytes_over_time
from memo.planner.plan import ALIGN, solve_level1
from memo.profile import profile_model
from models import planner_layer
from test_profile import SMALL

# The planner rounds every allocation up to ALIGN (512) bytes, as the CUDA caching allocator
# does, so its peak is above the exact one by at most 511 B per tensor live at the peak; and its
# layout may leave gaps (fragmentation) above the lower bound. Observed on these layers: 0.3% to
# 0.7% above, all of it rounding (the layouts reach their lower bound). 10% leaves room for
# layouts with gaps while a peak that misses a whole saved tensor or a transient (>= 5% here)
# still fails.
PEAK_TOLERANCE = 0.10

LAYERS = SMALL   # the profiler tests' small layers
SEQ, MICRO_BATCH = 64, 2


class _LiveBytes(TorchDispatchMode):
    """After every op: the (serial, bytes) of each storage created inside that is still alive.

    Only weak references are held, so nothing lives longer for being watched. Storages in
    ``ignore`` (parameters, shared tables) and those made before the mode (except the ones passed
    to :meth:`track`) are never counted. A serial number, not the storage address (which is
    reused after a free), names each storage.
    """

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore = ignore
        self.entries: dict[int, tuple[StorageWeakRef, int, int]] = {}   # address -> (ref, bytes, serial)
        self.steps: list[list[tuple[int, int]]] = []
        self._serial = 0

    def track(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        self.entries[storage._cdata] = (StorageWeakRef(storage), storage.nbytes(), self._serial)
        self._serial += 1
        return self._serial - 1

    def serial_of(self, t: torch.Tensor) -> int:
        ref, _, serial = self.entries[t.untyped_storage()._cdata]
        assert not ref.expired()
        return serial

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith("prim."):
            return out
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            key = t.untyped_storage()._cdata
            entry = self.entries.get(key)
            if key not in self.ignore and (entry is None or entry[0].expired()):
                self.track(t)
        self.steps.append([(serial, nbytes) for ref, nbytes, serial in self.entries.values() if not ref.expired()])
        return out


def _measure(model: dict) -> tuple[list[int], list[int]]:
    """Live bytes at each forward step and at each backward step of a real fp32 layer run."""
    layer, x, shared = planner_layer(model, MICRO_BATCH, SEQ)
    fixed = [*layer.parameters(), *layer.buffers(), *(shared or ())]
    live = _LiveBytes({t.untyped_storage()._cdata for t in fixed})
    live.track(x)
    # The profiler runs its layer under a pack hook returning t.detach() (one aten op per saved
    # tensor, same storage); so does this run, so that step k is the same op on both sides.
    with live, torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
        res = layer(x) if shared is None else layer(x, attention_mask=None, position_embeddings=shared)
        out = res[0] if isinstance(res, tuple) else res
    del res
    n_fwd = len(live.steps)
    with live:
        out.backward(torch.ones_like(out))
    dropped = {live.serial_of(p.grad) for p in layer.parameters()} | {live.serial_of(out)}
    per_step = [sum(b for s, b in step if s not in dropped) for step in live.steps[n_fwd:]]
    return [sum(b for _, b in step) for step in live.steps[:n_fwd]], per_step


def _profiled(trace) -> list[int]:
    """The profile's live bytes at each step of a trace (unaligned, parameter gradients left out)."""
    changes = dict(live_bytes_over_time(trace.to_allocs()))
    out, cur = [], 0
    for step in range(trace.steps):
        cur = changes.get(step, cur)
        out.append(cur)
    return out


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer_run(request):
    model = LAYERS[request.param]
    prof = profile_model(model, seq_len=SEQ, micro_batch=MICRO_BATCH, dtype="fp32", loss_chunk=None)
    assert "layer_input" in [s["kind"] for s in prof.saved]     # rule 3 of the module docstring
    return request.param, prof, _measure(model)


def test_level1_peaks_match_a_measured_layer_run(layer_run):
    family, prof, (fwd, bwd) = layer_run
    level1 = solve_level1(prof.to_dict(), time_limit=10.0, threads=1)
    for phase, planned, measured in (("forward", level1.forward, max(fwd)), ("backward", level1.backward, max(bwd))):
        ratio = planned.peak / measured
        assert measured <= planned.peak <= (1 + PEAK_TOLERANCE) * measured, \
            f"{family} {phase}: planned peak {planned.peak} B is {ratio:.3f}x the measured {measured} B"
        # All of the difference is rounding when the layout reaches its lower bound.
        if planned.optimal:
            live_at_peak = max(len([a for a in planned.allocs if a.start <= k < a.end])
                               for k in range(max(a.end for a in planned.allocs)))
            assert planned.peak - measured < ALIGN * live_at_peak, (family, phase)


def test_profiled_live_bytes_equal_the_measured_ones_at_every_step(layer_run):
    family, prof, (fwd, bwd) = layer_run
    for phase, trace, measured in (("forward", prof.forward, fwd), ("backward", prof.backward, bwd)):
        profiled = _profiled(trace)
        assert len(profiled) == len(measured), (family, phase, len(profiled), len(measured))
        diff = [(k, p, m) for k, (p, m) in enumerate(zip(profiled, measured)) if p != m]
        assert not diff, f"{family} {phase}: (step, profiled, measured) differ at {diff[:5]} ({len(diff)} steps)"
