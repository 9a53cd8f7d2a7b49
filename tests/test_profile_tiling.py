"""memo.profile profiles the layer as the runtime runs it: the MLP tiled (NOTE [ Profiler allocation
steps ] rule 6), its intermediates one tile at a time, its input the only MLP tensor saved."""

import pytest
import torch

from memo import tiling
from memo.profile import AllocationRecorder, _layer_classes, _storage_key, hf_config_from_model, \
    profile_layer_saved, profile_model

MODEL = {"model_type": "llama", "layers": 2, "hidden": 64, "intermediate": 512, "heads": 4, "kv_heads": 2,
         "head_dim": 16, "vocab": 128}
SEQ, TILE, F32 = 1024, 128, 4


def _intermediate_sizes(trace, tokens):
    """Allocations (batch 1) as wide as the MLP's intermediate over ``tokens`` tokens or more."""
    width = MODEL["intermediate"] * F32
    return [r.bytes for r in trace.allocs if r.bytes >= width * tokens and r.bytes % width == 0]


def test_tiled_profile_holds_one_tile_of_mlp_intermediates():
    tiled = profile_model(MODEL, seq_len=SEQ, dtype="fp32", tile_tokens=TILE)
    untiled = profile_model(MODEL, seq_len=SEQ, dtype="fp32", tile_tokens=None)
    assert tiled.tile_tokens == TILE and untiled.tile_tokens is None
    tile_bytes = TILE * MODEL["intermediate"] * F32
    for part in ("forward", "backward"):
        full = _intermediate_sizes(getattr(untiled, part), SEQ)
        # Untiled, gate/up/activation (and their gradients) span the whole sequence ...
        assert len(full) >= 3, (part, full)
        # ... tiled, no MLP transient is wider than one tile, and each tile's are there.
        assert _intermediate_sizes(getattr(tiled, part), TILE + 1) == [], part
        per_tile = [b for b in _intermediate_sizes(getattr(tiled, part), TILE) if b == tile_bytes]
        assert len(per_tile) >= 3 * (SEQ // TILE), (part, len(per_tile))
    # The saved set: the MLP's intermediates are gone, its input (the norm's output) stays.
    assert tiled.saved_bytes["other"] + tiled.mlp_saved_bytes == untiled.saved_bytes["other"]
    assert tiled.mlp_saved_bytes >= 3 * SEQ * MODEL["intermediate"] * F32
    assert all(s["shape"][-1] != MODEL["intermediate"] for s in tiled.saved)
    # The arenas shrink with them (lower bound = live bytes).
    from memo.planner.layout import lower_bound
    assert lower_bound(tiled.backward.to_allocs()) < 0.6 * lower_bound(untiled.backward.to_allocs())


def test_auto_tile_follows_the_runtime_rule():
    prof = profile_model(MODEL, seq_len=1 << 16, dtype="fp32", tile_tokens="auto")
    want = tiling.auto_tile(batch=1, seq=1 << 16, hidden=MODEL["hidden"], intermediate=MODEL["intermediate"],
                            itemsize=F32)
    assert want is not None and prof.tile_tokens == want and prof.to_dict()["tile_tokens"] == want
    # Short sequences run untiled under "auto" (no extra compute where the MLP does not limit memory).
    assert profile_model(MODEL, seq_len=512, dtype="fp32").tile_tokens is None


def test_bad_tile_setting_is_refused():
    from memo.errors import MemoError
    with pytest.raises(MemoError, match="tile_tokens=0 is not accepted"):
        profile_model(MODEL, seq_len=SEQ, dtype="fp32", tile_tokens=0)


def test_tiled_fake_trace_equals_a_real_tiled_layer_run():
    """The profile runs the runtime's own tiling (memo.tiling.install) on the fake layer: a real fp32
    layer with the same tiling installed allocates the same sizes at the same steps."""
    prof = profile_model(MODEL, seq_len=SEQ, dtype="fp32", tile_tokens=TILE)
    torch.manual_seed(0)
    cfg = hf_config_from_model(MODEL)
    layer_cls, rope_cls, _ = _layer_classes(cfg)
    layer = layer_cls(cfg, layer_idx=0)
    tiling.install([layer], TILE, MODEL["intermediate"])
    x = torch.randn(1, SEQ, MODEL["hidden"], requires_grad=True)
    shared = tuple(t.detach() for t in rope_cls(cfg)(x, torch.arange(SEQ).unsqueeze(0)))
    static = {_storage_key(p) for p in layer.parameters()} | {_storage_key(t) for t in shared}
    rec = AllocationRecorder(static)
    rec.add(_storage_key(x), x.untyped_storage().nbytes(), "layer_input", "argument", start=0)
    rec.step = -1
    with rec:
        saved, out = profile_layer_saved(layer, x, shared)
    real = rec.close()
    assert [(s["shape"], s["bytes"]) for s in saved] == [(s["shape"], s["bytes"]) for s in prof.saved]
    assert [(r.bytes, r.start, r.end) for r in real.allocs] == [(r.bytes, r.start, r.end) for r in prof.forward.allocs]
