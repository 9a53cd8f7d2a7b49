"""A wrapped tiny Llama / Mistral training step with sequence parallelism (2 and 4 gloo ranks).

Against the plain single-process model: same loss on every rank and same gradients (after
memo.parallel.all_reduce_gradients) within twice the plain fp32 model's own error against fp64,
with and without swapping, zigzag and contiguous, ring and Ulysses (2 ranks) / hybrid (4 ranks);
packed documents against the documents run one by one; and recomputation of a swapped SP layer
sends no message (the sequence-parallel attention op is replayed, not run).
"""

import numpy as np
import pytest

from distributed import launch


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return request.param, launch("model_cases.py", request.param)


STEPS = ("llama-swap", "llama-noswap", "mistral-swap", "llama-swap-contiguous", "llama-swap-model-loss",
         "llama-ulysses-swap", "llama-tiled-swap", "llama-tiled-ulysses-swap", "llama-input-layers")


@pytest.mark.parametrize("step", STEPS)
def test_loss_and_gradients_match_one_process(results, step):
    world, per_rank = results
    failures = []
    for rank, res in enumerate(per_rank):
        for name, (err, plain) in res[step]["errors"].items():
            # The loss is one fp32 scalar: where the plain model happens to hit fp64 exactly, allow one
            # fp32 spacing of it (the sum over ranks rounds once more).
            floor = float(np.spacing(np.float32(res[step]["loss"]))) if name == "loss" else 0.0
            if not err <= 2 * max(plain, floor):
                failures.append(f"rank {rank} {name}: error {err:.3g} > 2 x plain fp32 {plain:.3g}")
    assert not failures, f"{step} on {world} ranks:\n" + "\n".join(failures)
    assert len({res[step]["loss"] for res in per_rank}) == 1, "every rank must report the same (global) loss"


def test_swapping_runs_per_rank_and_recompute_sends_no_message(results):
    world, per_rank = results
    for res in per_rank:
        swap, noswap = res["llama-swap"], res["llama-noswap"]
        assert swap["swapped_bytes"] > 0 and swap["recomputed_bytes"] > 0
        assert noswap["swapped_bytes"] == 0 and noswap["recompute_calls"] == 0
        for step in STEPS:
            if res[step]["recomputed_bytes"] and "input" not in res[step]["policies"]:   # "input" layers run attention
                assert res[step]["recompute_calls"] == 3, step   # 4 layers, the last kept
                assert res[step]["recompute_messages"] == 0, f"{step}: recomputation sent messages"


def test_each_rank_swaps_its_share_of_the_sequence(results):
    world, per_rank = results
    for res in per_rank:
        step = res["llama-swap"]
        assert step["swapped_bytes"] * world == step["one_process_swapped_bytes"], (world, step)


def test_packed_documents_match_separate_runs(results):
    world, per_rank = results
    for res in per_rank:
        got, want = res["packed"]["loss"]
        assert abs(got - want) <= 4 * float(np.spacing(np.float32(want))), (got, want)
        assert res["packed"]["grad_max_diff"] <= 1e-5 * res["packed"]["grad_scale"], res["packed"]


def test_tiles_and_input_layers_under_sequence_parallelism(results):
    """NOTE [ Token tiling ] and NOTE [ Layer policies ] on every rank (exactness: the steps above)."""
    world, per_rank = results
    for res in per_rank:
        assert res["llama-tiled-swap"]["tiles"] == [16] * 4
        assert res["llama-tiled-ulysses-swap"]["tiles"] == [16] * 4
        step = res["llama-input-layers"]
        assert step["policies"] == ["input"] * 3 + ["kept"]
        assert step["layer_swapped_bytes"][:3] == [128 // world * 64 * 4] * 3   # the layer input only
