"""What the sharded-checkpoint tests assert of a resumed run (tests/test_checkpoint_sharded.py, test_checkpoint_zero.py)."""

import torch


def assert_resumed_exactly(first: dict, resumed: dict, where: str) -> None:
    """The resumed run loaded the uninterrupted run's parameters at step 2 and took the same step 3, bit for bit.

    Each dict holds ``params_at_3`` and ``loss_3`` (``params_at_2`` too, when the run reports it)."""
    for key in ("params_at_2", "params_at_3"):
        if key not in first:
            continue
        assert first[key].keys() == resumed[key].keys(), where
        for n in first[key]:
            assert torch.equal(first[key][n], resumed[key][n]), f"{where}: {n} differs ({key})"
    assert torch.equal(first["loss_3"], resumed["loss_3"]), (where, first["loss_3"].item(), resumed["loss_3"].item())
