"""memo.profile: the FakeTensor profile of a layer equals a real run of the same layer."""

import json
import time

import pytest
import torch

from memo.errors import MemoError
from memo.planner.layout import lower_bound
from memo.profile import (AllocationRecorder, _layer_classes, _storage_key, check_seq_len, hf_config_from_model,
                          load_model, model_identity, profile_layer_saved, profile_model)

SMALL = {
    "llama": {"model_type": "llama", "layers": 2, "hidden": 64, "intermediate": 160, "heads": 4, "kv_heads": 2,
              "head_dim": 16, "vocab": 128},
    "qwen2": {"model_type": "qwen2", "layers": 2, "hidden": 64, "intermediate": 96, "heads": 4, "kv_heads": 1,
              "head_dim": 16, "vocab": 128},
    "gpt2": {"model_type": "gpt2", "layers": 2, "hidden": 64, "intermediate": 256, "heads": 4, "kv_heads": 4,
             "head_dim": 16, "vocab": 128},
}


def _real_run(model, seq):
    """Run the real (non-fake) layer in fp32 and record what it saves and allocates."""
    torch.manual_seed(0)
    cfg = hf_config_from_model(model)
    layer_cls, rope_cls, _ = _layer_classes(cfg)
    layer = layer_cls(cfg, layer_idx=0)
    x = torch.randn(1, seq, model["hidden"], requires_grad=True)
    shared = None
    if model["model_type"] != "gpt2":
        shared = tuple(t.detach() for t in rope_cls(cfg)(x, torch.arange(seq).unsqueeze(0)))
    static = {_storage_key(p) for p in layer.parameters()} | ({_storage_key(t) for t in shared} if shared else set())
    rec = AllocationRecorder(static)
    rec.add(_storage_key(x), x.untyped_storage().nbytes(), "layer_input", "argument", start=0)
    rec.step = -1
    with rec:
        saved, out = profile_layer_saved(layer, x, shared)
    fwd = rec.close()
    return saved, fwd, out


@pytest.mark.parametrize("family", sorted(SMALL))
def test_profiled_saved_tensors_equal_a_real_layer_run(family):
    """FakeTensorMode changes nothing the recorder sees. Both sides use the same recorder, so this
    cannot catch the recorder's own mistakes (late frees, missed tensors): the recorder and the
    planner's peaks are checked against live bytes measured without it in test_profile_peak.py."""
    model = SMALL[family]
    seq = 48
    prof = profile_model(model, seq_len=seq, dtype="fp32")
    real_saved, real_fwd, real_out = _real_run(model, seq)
    assert real_out.shape == (1, seq, model["hidden"]) and torch.isfinite(real_out).all()
    fake = [(s["shape"], s["dtype"], s["bytes"]) for s in prof.saved]
    real = [(s["shape"], s["dtype"], s["bytes"]) for s in real_saved]
    assert fake == real
    # The allocation trace (sizes, steps, frees) of the forward is the same as well.
    assert [(r.bytes, r.start, r.end) for r in prof.forward.allocs] == \
           [(r.bytes, r.start, r.end) for r in real_fwd.allocs]


def test_saved_tensor_classes_of_a_llama_layer():
    model = SMALL["llama"]
    b, s, h, heads, d = 2, 64, 64, 4, 16
    prof = profile_model(model, seq_len=s, micro_batch=b, dtype="fp32")
    kinds = [x["kind"] for x in prof.saved]
    assert kinds.count("lse") == 1 and "attention_output" in kinds and "shared" in kinds and "param" in kinds
    sb = prof.saved_bytes
    assert sb["layer_input"] == b * s * h * 4
    assert sb["attention_output"] == b * heads * s * d * 4      # the kernel's output, counted once
    assert sb["lse"] == b * heads * s * 4                       # fp32 log-sum-exp
    assert sb["shared"] == 2 * s * d * 4                        # RoPE cos and sin, kept once
    # Level-1 inputs: the forward starts from the layer input, the backward from the saved activations.
    assert prof.forward.allocs[0].kind == "layer_input" and prof.forward.allocs[0].start == 0
    carried = [r for r in prof.backward.allocs if r.op == "carried"]
    # In fp32 RMSNorm's upcast is a no-op, so the layer input itself is saved (by pow and mul).
    assert "layer_input" in kinds
    assert sum(r.bytes for r in carried) == sb["layer_input"] + sb["attention_output"] + sb["lse"] + sb["other"]
    assert any(r.kind == "param_grad" for r in prof.backward.allocs)
    assert all(r.kind != "param_grad" for r in prof.backward.to_allocs())
    assert lower_bound(prof.backward.to_allocs()) >= sum(r.bytes for r in carried)


def test_sequence_parallel_profiles_the_local_length_and_ring_buffers():
    model = SMALL["llama"]
    p1 = profile_model(model, seq_len=256, dtype="fp32", sp=1)
    p4 = profile_model(model, seq_len=256, dtype="fp32", sp=4)
    assert p4.local_seq_len == 64
    assert p4.saved_bytes["layer_input"] * 4 == p1.saved_bytes["layer_input"]
    ring = [r for r in p4.forward.allocs if r.kind == "ring_buffer"]
    kv = 2 * 64 * model["kv_heads"] * model["head_dim"] * 4
    assert [r.bytes for r in ring] == [2 * kv]
    assert not any(r.kind == "ring_buffer" for r in p1.forward.allocs)


def test_7b_llama_layer_at_1m_tokens_profiles_in_seconds():
    t0 = time.perf_counter()
    prof = profile_model(load_model("llama2-7b"), seq_len=1 << 20)
    assert time.perf_counter() - t0 < 30
    s, h = 1 << 20, 4096
    assert prof.saved_bytes["layer_input"] == s * h * 2
    assert prof.saved_bytes["attention_output"] == s * h * 2
    assert prof.saved_bytes["lse"] == 32 * s * 4
    json.dumps(prof.to_dict())


def test_paper_gpt_layer_saves_16_sbh():
    # The paper: a GPT layer's skeletal tensors are 16 * b * s * h elements (its MLP untiled).
    prof = profile_model(load_model("memo-paper-7b"), seq_len=1 << 17, sp=8, tile_tokens=None)
    s, h = (1 << 17) // 8, 4096
    sb = prof.saved_bytes
    total = sb["layer_input"] + sb["attention_output"] + sb["other"]
    assert total // 2 == pytest.approx(16 * s * h, rel=0.01)
    # Tiled (NOTE [ Profiler allocation steps ] rule 6), ln_2 and the MLP save ln_2's input only
    # (NOTE [ Token tiling ] rule 8): the up projection's and the activation's outputs (4sh each),
    # ln_2's output (sh) and its per-token statistic (s fp32) leave the saved set, and the profile
    # says how many bytes they were.
    tiled = profile_model(load_model("memo-paper-7b"), seq_len=1 << 17, sp=8, tile_tokens=4096)
    assert tiled.tile_tokens == 4096 and tiled.mlp_saved_bytes == (2 * 4 + 1) * s * h * 2 + s * 4
    assert tiled.saved_bytes["other"] + tiled.mlp_saved_bytes == sb["other"]


def test_model_identity_and_presets():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=1000)
    ident = model_identity(cfg)
    assert ident == {"model_type": "llama", "layers": 3, "hidden": 256, "intermediate": 512, "heads": 8,
                     "kv_heads": 2, "head_dim": 32, "vocab": 1000}
    assert model_identity(hf_config_from_model(load_model("memo-paper-13b"))) == \
        {k: v for k, v in load_model("memo-paper-13b").items() if k != "name"}


def test_load_model_errors(tmp_path):
    with pytest.raises(MemoError, match="unknown model preset 'llama9-1t'.*memo-paper-7b.*qwen2-7b"):
        load_model("llama9-1t")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(MemoError, match="lacks num_hidden_layers, intermediate_size, num_attention_heads, vocab_size"):
        load_model(str(bad))
    bad.write_text("{not json")
    with pytest.raises(MemoError, match="not valid JSON"):
        load_model(str(bad))
    good = tmp_path / "m"
    good.mkdir()
    (good / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 128, "num_hidden_layers": 2,
                                                  "intermediate_size": 256, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "vocab_size": 100}))
    m = load_model(str(good))
    assert m["head_dim"] == 32 and m["kv_heads"] == 2


def test_seq_len_the_zigzag_layout_cannot_split():
    assert check_seq_len(1 << 20, 8) == 1 << 17
    with pytest.raises(MemoError, match="multiple of 2 x sp = 16.*use 992 or 1008"):
        check_seq_len(1001, 8)


def test_swap_ratio_reports_swapped_and_recomputed_bytes():
    prof = profile_model(SMALL["llama"], seq_len=64, dtype="fp32", swap_ratio=0.25)
    sb = prof.saved_bytes
    assert prof.swapped_bytes == int(sb["layer_input"] + sb["attention_output"] + sb["lse"] + 0.25 * sb["other"])
    assert prof.recomputed_bytes == int(0.75 * sb["other"])
    assert prof.to_dict()["swapped_bytes"] == prof.swapped_bytes
    with pytest.raises(MemoError, match="outside \\[0, 1\\]"):
        profile_model(SMALL["llama"], seq_len=64, swap_ratio=2.0)
