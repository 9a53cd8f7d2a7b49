"""Bad input and dead or hung ranks under sequence parallelism (2 gloo ranks)."""

import pytest

from distributed import launch


@pytest.fixture(scope="module")
def inputs():
    return launch("faults.py", 2, mode="input")


def test_shapes_and_dtypes_that_differ_between_ranks_fail_on_every_rank(inputs):
    for rank in (0, 1):
        msg, _ = inputs[rank]["length"]
        assert msg is not None and "differs between the ranks" in msg
        assert "rank 0: " in msg and "local_seq=16" in msg and "rank 1: " in msg and "local_seq=24" in msg
        msg, _ = inputs[rank]["dtype"]
        assert msg is not None and "dtype=0" in msg and "dtype=1" in msg


def test_ulysses_with_indivisible_heads_suggests_the_ring(inputs):
    for key in ("ulysses_heads", "wrap_ulysses_heads"):
        msg, _ = inputs[0][key]
        assert msg is not None and "3 attention heads" in msg and "sp_backend='ring'" in msg


def test_other_bad_input_names_the_fix(inputs):
    msg, _ = inputs[0]["indivisible"]
    assert msg is not None and "30" in msg and "pad it to a multiple of 4" in msg
    msg, _ = inputs[0]["wrap_size"]
    assert msg is not None and "sequence_parallel_size=3 does not divide the world size 2" in msg
    msg, _ = inputs[0]["unshifted_labels"]
    assert msg is not None and "shift_labels" in msg and "shard_batch" in msg
    for rank in (0, 1):
        msg, _ = inputs[rank]["different_batches"]
        assert msg is not None and "were given different batches" in msg and "rank 1: batch x seq 1 x 64" in msg
    msg, _ = inputs[0]["padding_mask"]
    assert msg is not None and "attention_mask must be all ones" in msg
    msg, elapsed = inputs[1]["padding_mask"]   # rank 1's own mask was fine
    assert msg is not None and "rank(s) [0] refused this forward's input" in msg and elapsed < 60
    msg, _ = inputs[0]["lse_grad"]
    assert msg is not None and "not differentiable" in msg


def test_bad_input_on_one_rank_fails_every_rank_without_waiting(inputs):
    msg, _ = inputs[1]["one_rank_odd"]
    assert msg is not None and "(odd)" in msg
    msg, elapsed = inputs[0]["one_rank_odd"]
    assert msg is not None and "input_ok=0" in msg and elapsed < 60


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_fails_the_other_within_the_timeout(mode):
    res = launch("faults.py", 2, mode=mode, timeout=120)
    msg, elapsed = res[0][mode]
    assert msg is not None, f"rank 0 did not fail when rank 1 {mode}s"
    # (the first thing each call does is its cross-rank shape check, then the ring exchanges)
    assert "memo.parallel: rank 0 gave up on" in msg and "with rank(s) [1]" in msg
    assert elapsed < 5 + 10, f"rank 0 took {elapsed:.1f} s with a 5 s timeout"
