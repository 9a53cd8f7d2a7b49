"""``memo.parallel.all_reduce_gradients`` under data x sequence parallelism (issue 18 item 4).

4 gloo ranks, 2 data-parallel replicas x sequence parallelism 2 (tests/sp_workers/dp_sp_grads.py):
the sum runs over the model's own sequence-parallel group, under its ``sp_timeout_s``.
"""

import pytest

from distributed import launch


@pytest.fixture(scope="module")
def per_rank():
    return launch("dp_sp_grads.py", 4, timeout=180)


def test_each_replica_gets_its_own_full_sequence_gradient(per_rank):
    failures = []
    for rank, res in enumerate(per_rank):
        assert res["sp_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        for name, (err, plain, scale) in res["errors"].items():
            if not err <= 2 * plain:
                failures.append(f"rank {rank} {name}: error {err:.3g} > 2 x plain fp32 {plain:.3g} (scale {scale:.3g})")
    assert not failures, "\n".join(failures[:10])


def test_a_group_other_than_the_models_is_refused(per_rank):
    for res in per_rank:
        message, _ = res["world_group"]
        assert message and "group has ranks [0, 1, 2, 3], the model's sequence-parallel group" in message, message
        assert res["own_group"][0] is None
        assert "not wrapped by memo" in res["unwrapped"][0]


def test_a_silent_peer_fails_its_group_after_the_models_timeout(per_rank):
    message, seconds = per_rank[2]["peer_silent"]
    assert message and "timeout 3 s" in message, message
    assert 2.5 <= seconds < 8, f"rank 2 waited {seconds:.1f} s; the model's sp_timeout_s is 3 s (rank 3 left at 12 s)"
    for rank in (0, 1):
        assert per_rank[rank]["peer_silent"][0] is None, "the other replica does not wait for rank 3"
