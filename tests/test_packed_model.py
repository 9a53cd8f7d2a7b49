"""Packed documents on one process: a wrapped model's step on a packed batch against the documents run
one by one (loss and every gradient within twice the plain fp32 model's error against fp64), with no
s x s mask built; recomputation replays memo's attention op; bad position_ids and masks refused.

See NOTE [ Packed documents ] (memo/parallel/documents.py) and NOTE [ Document blocks ]
(memo/attention/documents.py).
"""

import copy

import pytest
import torch

import memo
import memo.attention.op as op
from memo.memtrack import track_storages
from models import build
from packed_data import grads, errors, pack

CASES = {
    # name: (family, documents per row, padding after the last document, swap ratio, kept layers)
    "uneven-and-1-token": ("llama", [[40, 56, 1, 31]], 0, 0.5, 1),
    "batch-2-own-packing": ("llama", [[30, 1, 1, 60], [64, 28]], 0, 0.0, 1),
    "padding-after-last": ("llama", [[50, 30]], 12, 1.0, 1),
    "all-layers-kept": ("llama", [[40, 56, 1, 31]], 0, 0.5, 4),
    "qwen2": ("qwen2", [[33, 20, 40]], 0, 0.5, 1),
    "mistral-no-kept": ("mistral", [[33, 20, 40]], 0, 0.25, 0),
}


def _wrapped(model, ratio, keep, **extra):
    return memo.wrap(copy.deepcopy(model), memo.MemoConfig(swap_ratio=ratio, keep_last_layers=keep,
                                                           host_memory_budget="1GiB", **extra))


@pytest.mark.parametrize("case", list(CASES))
def test_packed_step_matches_documents_one_by_one(case):
    family, rows, pad, ratio, keep = CASES[case]
    model = build(family, seed=5)
    ids, positions, shift, mask, docs = pack(rows, pad=pad)
    twin = _wrapped(model, ratio, keep)
    out = twin(input_ids=ids, position_ids=positions, attention_mask=mask, shift_labels=shift, labels=shift)
    out.loss.backward()
    failures = errors(model, out.loss.item(), grads(twin), ids, shift, docs)
    assert not failures, f"{case}:\n" + "\n".join(failures)
    st = memo.stats(twin)
    if ratio < 1 and keep < 4:
        assert st.recomputed_bytes > 0, "the case must recompute tokens"


def test_input_layers_rerun_attention_on_the_documents():
    """NOTE [ Layer policies ]: "input" layers run their whole forward again in backward, attention included,
    on the same documents (the binding keeps them until the next forward)."""
    from memo.runtime import _aligned
    model = build("llama", seed=5)
    ids, positions, shift, _, docs = pack([[40, 56, 1, 31]])
    twin = memo.wrap(copy.deepcopy(model), memo.MemoConfig(
        swap_ratio="auto", keep_last_layers=1, tile_tokens=None,
        host_memory_budget=3 * _aligned(128 * 64 * 4)))   # holds the three swapped layers' inputs only
    out = twin(input_ids=ids, position_ids=positions, shift_labels=shift, labels=shift)
    out.loss.backward()
    assert [s.policy for s in memo.stats(twin).layers] == ["input"] * 3 + ["kept"]
    failures = errors(model, out.loss.item(), grads(twin), ids, shift, docs)
    assert not failures, "\n".join(failures)


def test_recompute_replays_the_attention_op_and_no_mask_is_built(monkeypatch):
    """Attention runs once per layer in forward and never again before the backward (the swap executor
    replays its swapped outputs); no tensor of the step is s x s."""
    calls = {"forward": 0}
    real = op.sp_forward

    def counting(*args, **kwargs):   # observes; the real attention runs
        calls["forward"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "sp_forward", counting)
    model = build("llama", seed=5)
    seq = 512
    ids, positions, shift, _, _ = pack([[64] * 8])
    twin = _wrapped(model, 0.5, 1)
    with track_storages() as tracker:
        out = twin(input_ids=ids, position_ids=positions, shift_labels=shift, labels=shift)
        square = [r for r in tracker.alive() if sum(1 for d in r.shape if d == seq) >= 2]
        assert calls["forward"] == 4
        out.loss.backward()
    assert not square, f"s x s tensors alive after the forward: {square}"
    assert calls["forward"] == 4, "recomputation ran attention again"
    assert memo.stats(twin).recomputed_bytes > 0


def test_unpacked_position_ids_keep_the_sdpa_path():
    """position_ids counting up (one document per row) are not packing: bit-exact with the plain model."""
    model = build("llama", seed=5)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(64).expand(2, 64)
    plain = copy.deepcopy(model)
    plain(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    twin = _wrapped(model, 1.0, 1, loss_chunk_size=None)   # the model's own loss: the same sums
    twin(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    for (n, p), q in zip(plain.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("bad, token, words", [
    ([0, 1, 2, 1, 2], 3, "go from 2 to 1 at token 3"),      # decreasing, not to 0
    ([0, 1, 1, 2, 3], 2, "go from 1 to 1 at token 2"),      # repeated
    ([0, 1, 2, 5, 6], 3, "go from 2 to 5 at token 3"),      # jumping
    ([-1, 0, 1, 2, 3], 0, "start at -1 (token 0)"),
])
def test_position_ids_breaking_the_rule_are_refused(bad, token, words):
    model = _wrapped(build("llama", seed=5), 0.5, 1)
    ids = torch.randint(0, 128, (2, 5))
    positions = torch.stack([torch.tensor([0, 1, 0, 1, 2]), torch.tensor(bad)])
    with pytest.raises(memo.MemoError, match="position_ids of row 1 " + words.replace("(", r"\(").replace(")", r"\)")) \
            as e:
        model(input_ids=ids, position_ids=positions, labels=ids)
    assert "count up by one within a document and restart at 0" in str(e.value)


def test_a_mask_inside_a_document_is_refused_with_which_to_use():
    model = _wrapped(build("llama", seed=5), 0.5, 1)
    ids, positions, shift, _, _ = pack([[20, 30, 14]])
    mask = torch.ones_like(ids)
    mask[0, 25] = 0   # inside the second document
    with pytest.raises(memo.MemoError, match="masks token 25 of row 0, inside a packed document") as e:
        model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=shift)
    assert "Use one of the two" in str(e.value)
    mask4d = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    with pytest.raises(memo.MemoError, match="4-D attention_mask was given with packed position_ids"):
        model(input_ids=ids, position_ids=positions, attention_mask=mask4d, labels=shift)


def test_backend_info_names_the_packed_kernels():
    info = memo.backend_info()["packed_documents"]
    assert "one torch CPU flash kernel call per document" in info["cpu"]
    assert "varlen" in info["cuda"]
