"""Phase boundaries of planned memory (NOTE [ Planned memory at run time ] rules 3 and 5),
driven by real autograd hooks over the CPU arena replay: each swapped layer's backward
allocations must fall in the backward phase, and the phase must end with the backward."""

import pytest
import torch

from memo import _ext
from memo.arena import ArenaPlan, ArenaReplay
from memo.planned_memory import LayerPhases
from models import AllocatesInBackward

pytestmark = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")

BLOCK = 512   # the one planned backward request of every layer (phase 1, offset 0)


@pytest.fixture(autouse=True)
def csrc_on(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")


def _stack(phases, arena, x, weights):
    """Swapped layers as memo runs them: each layer's input is the previous layer's output."""
    h = x
    for w in weights:
        with phases.forward(h) as outputs:
            out = AllocatesInBackward.apply(h * w, arena, BLOCK) + h   # a residual, as in a decoder layer
            outputs.append(out)
        h = out
    return h


def _arena():
    return ArenaReplay(ArenaPlan(arena_bytes=BLOCK, phases=[[], [(0, BLOCK)]]))


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_every_layer_backward_runs_in_the_backward_phase_and_the_phase_ends_with_it(input_requires_grad):
    arena = _arena()
    phases = LayerPhases(arena)
    weights = [torch.nn.Parameter(torch.full((4,), 1.5)) for _ in range(3)]
    for step in range(2):
        x = torch.ones(4, requires_grad=input_requires_grad)
        _stack(phases, arena, x, weights).sum().backward()
        s = arena.stats()
        # Layer i-1's begin hook and layer i's end hook sit on one tensor (rule 5): every
        # layer's request is a hit in phase 1, none is outside a phase.
        assert (s["hits"], s["outside"]) == (3 * (step + 1), step), s
        # After the backward (also when the first input needs no gradient) the phase is over.
        arena.free(arena.allocate(BLOCK))
        assert arena.stats()["outside"] == step + 1
