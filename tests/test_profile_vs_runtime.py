"""The planner's profile of a layer (FakeTensorMode, memo.profile) and the runtime's own accounting
of a real wrapped step agree byte for byte on what one layer swaps whole and what it splits."""

import pytest

import memo
from memo.profile import model_identity, profile_model
from memo.wrap import runtime_of
from models import batch, build, run_step


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_profiled_swap_sizes_equal_the_runtime(kind):
    model = build(kind)
    identity = dict(model_identity(model.config), name=kind)
    profile = profile_model(identity, seq_len=64, micro_batch=2, dtype="fp32", sp=1)
    memo.wrap(model, memo.MemoConfig(swap_ratio=1.0, loss_chunk_size=None, host_memory_budget="1GiB"))
    run_step(model, [batch(2, 64)])
    sizes = runtime_of(model).sizes
    saved = profile.saved_bytes
    assert sizes["fixed_bytes_per_layer"] == saved["layer_input"] + saved["attention_output"] + saved["lse"]
    assert sizes["other_bytes_per_layer"] == saved["other"]
    assert memo.stats(model).layers[0].activation_bytes == sum(
        saved[k] for k in ("layer_input", "attention_output", "lse", "other"))
