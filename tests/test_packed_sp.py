"""Packed documents under ring, Ulysses and hybrid sequence parallelism (2 and 4 gloo ranks).

Against the documents run one by one: documents spanning rank boundaries and zigzag chunks, 1-token
documents, batch 2 with its own packing per row, padding after the last document, swap ratios, kept
layers, Qwen2 (hybrid, 4 ranks) and Mistral (Ulysses, 2 ranks); and position_ids breaking the rule refused with the same error on every
rank, whether the break is inside a rank's chunk or between two ranks' chunks.
"""

import pytest

from distributed import launch


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return request.param, launch("packed_cases.py", request.param)


def test_packed_steps_match_documents_one_by_one(results):
    world, per_rank = results
    failures = []
    for rank, res in enumerate(per_rank):
        for step, got in res.items():
            if step.startswith("bad"):
                continue
            failures += [f"rank {rank} {step}: {f}" for f in got["failures"]]
            if "kept" not in step:
                assert got["recomputed_bytes"] > 0, step
    assert not failures, f"{world} ranks:\n" + "\n".join(failures)
    for step in per_rank[0]:
        if not step.startswith("bad"):
            assert len({res[step]["loss"] for res in per_rank}) == 1, f"{step}: every rank reports the global loss"


def test_bad_position_ids_raise_the_same_error_on_every_rank(results):
    """A jump inside rank 0's first chunk (2 ranks) and one between two ranks' chunks (2 and 4 ranks)."""
    world, per_rank = results
    cases = {"bad-at-chunk-edge": 64 // (2 * world) * world}
    if world == 2:
        cases["bad-inside"] = 5
    for case, token in cases.items():
        messages = {res[case] for res in per_rank}
        assert len(messages) == 1, messages
        message = messages.pop()
        assert message is not None and "position_ids of row 1 go from" in message, (case, message)
        assert f"at token {token};" in message and "count up by one within a document and restart at 0" in message


def test_packing_with_a_mask_inside_a_document_is_refused_by_shard_batch(results):
    world, per_rank = results
    for res in per_rank:
        assert res["bad-mask"] is not None and "masks token 25 of row 0, inside a packed document" in res["bad-mask"]
        assert "Use one of the two" in res["bad-mask"]
