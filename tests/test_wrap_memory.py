"""memo's memory claims, measured without memo's counters (memo.memtrack, weak references only).

After a forward pass, the activation storages still alive must be exactly the kept layers' (and
what lies outside the decoder layers: the final norm, LM head, loss, RoPE tables); memo.stats
must agree with that measurement.
"""

import pytest
import torch

import memo
from memo.memtrack import track_storages
from models import batch, build, run_step, twin

LAYERS = 5


def _alive_after_forward(model, micro) -> int:
    ids, mask, labels = micro
    with track_storages() as tracker:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    alive = tracker.alive_bytes()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return alive


def _wrapped(model, keep, ratio):
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(swap_ratio=ratio, keep_last_layers=keep, loss_chunk_size=None,
                                 host_memory_budget="1GiB"))
    return m


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_only_kept_layers_stay_resident_and_stats_agree(ratio):
    model = build("llama", num_hidden_layers=LAYERS)
    micro = batch(2, 96, pad_last=7)
    plain = _alive_after_forward(twin(model), micro)

    runs = {}
    for keep in (0, 2):
        m = _wrapped(model, keep, ratio)
        run_step(m, [micro])                    # warm-up: the host pool is reserved once, before
        runs[keep] = (_alive_after_forward(m, micro), memo.stats(m))

    outside, st0 = runs[0]                      # every layer swapped: what remains is outside the layers
    alive, st = runs[2]
    assert all(layer.resident_bytes == 0 for layer in st0.layers)
    kept = [layer for layer in st.layers if layer.kept]
    assert [layer.index for layer in kept] == [LAYERS - 2, LAYERS - 1]
    # the kept layers' activations, as memo counts them, are exactly what the measurement adds
    assert alive - outside == sum(layer.resident_bytes for layer in kept) > 0
    # the swapped layers' activations, as memo counts them, are what left the device; what memo
    # adds is at most the shared layer arguments it keeps for recomputation (here the padding
    # mask and position ids, which the plain model frees after its forward)
    layer_bytes = sum(layer.activation_bytes for layer in st0.layers)
    plain_outside = plain - layer_bytes
    assert 0 <= outside - plain_outside <= st0.shared_bytes
    assert st0.shared_bytes < 0.05 * layer_bytes
    # resident share is about keep_last_layers / num_layers of the layers' activations
    assert (alive - outside) / layer_bytes == pytest.approx(2 / LAYERS, rel=0.05)
    # host side: swapped + recomputed bytes account for every swapped activation byte
    for layer in st.layers:
        if not layer.kept:
            assert layer.swapped_bytes + layer.recomputed_bytes == layer.activation_bytes
            assert layer.recomputed_bytes == 0 if ratio == 1.0 else layer.recomputed_bytes > 0
    assert st.host_pool["high_water_bytes"] >= st.swapped_bytes


def test_memtrack_and_stats_agree_per_rank_under_sequence_parallelism():
    from distributed import launch
    for res in launch("memory_cases.py", 2):
        outside, kept = res[0]["alive"], res[2]
        assert res[0]["kept_resident"] == 0
        assert kept["alive"] - outside == kept["kept_resident"] > 0
        for is_kept, activation, swapped, recomputed in kept["layers"]:
            if not is_kept:
                assert swapped + recomputed == activation and recomputed > 0
