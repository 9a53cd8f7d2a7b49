"""examples/train_long_context.py on a pretrained model and real text (issue 15 item 6), offline.

A tiny Llama saved with ``save_pretrained`` and a word-level tokenizer trained here with the
``tokenizers`` library on generated text stand in for a downloaded model; the documents are
generated too. Checked: the packing (EOS after every document, positions restarting at 0, no label
across a document boundary), bad --data files named with their line before any process starts,
and a run through `memo launch` (2 CPU processes, SP 2, swapping) with --model, --dtype and --data.
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_long_context.py")
CONFIG = os.path.join(ROOT, "examples", "accelerate", "memo_cpu.yaml")
sys.path.insert(0, os.path.join(ROOT, "examples"))

from long_context_data import DataError, PackedText, pack, read_documents  # noqa: E402

WORDS = [f"w{i}" for i in range(150)]


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A model directory (tiny Llama + tokenizer trained here) and a jsonl and a txt file of documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tmp = tmp_path_factory.mktemp("local")
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(40)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model_dir = tmp / "tiny-llama"
    tokenizer.save_pretrained(str(model_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(str(model_dir))
    jsonl = tmp / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "source": "generated"}) + "\n" for d in docs[:-1]) + "\n")
    txt = tmp / "book.txt"
    txt.write_text(docs[-1])
    return {"model": str(model_dir), "jsonl": str(jsonl), "txt": str(txt), "docs": docs, "tokenizer": tokenizer}


def test_documents_are_packed_with_eos_and_restarting_positions(local):
    tokenizer, eos = local["tokenizer"], local["tokenizer"].eos_token_id
    docs = read_documents([local["jsonl"], local["txt"]])
    assert docs == local["docs"]
    data = PackedText(tokenizer, docs, seq_len=64, length=1000)
    t = data.tensors
    stream = [tok for d in docs for tok in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    n = len(stream) // 64
    assert t["input_ids"].shape == (n, 64) and t["input_ids"].flatten().tolist() == stream[:n * 64]
    assert len(data) == 1000 and torch.equal(data[n]["input_ids"], data[0]["input_ids"])   # repeated in order
    ids, pos, labels = (t[k].flatten().tolist() for k in ("input_ids", "position_ids", "labels"))
    for i in range(1, len(ids)):
        if i % 64 == 0:
            assert pos[i] == 0, "every sequence starts at position 0"
        elif ids[i - 1] == eos:
            assert pos[i] == 0 and labels[i] == -100, "a document starts after EOS: position 0, no label"
        else:
            assert pos[i] == pos[i - 1] + 1 and labels[i] == ids[i]
    # A document cut by a sequence boundary continues from 0 in the next sequence.
    assert any(t["input_ids"][r - 1, -1] != eos for r in range(1, n)), "no document crosses a boundary here"


def test_pack_refuses_too_little_text():
    with pytest.raises(DataError, match="fewer than one sequence of --seq-len 64"):
        pack([[5, 6, 7]], 64, eos_id=1)


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("", "empty (no documents)"),
    ('{"text": "a b"}\n{"body": "c"}\n', 'line 2: no "text" field'),
    ('{"text": "a b"}\n\nnot json\n', "line 3: not a JSON object"),
    ('{"text": 5}\n', 'line 1: "text" is a int, not a string'),
])
def test_bad_data_files_are_named_with_their_line(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        read_documents([str(path)])
    assert str(e.value).startswith(str(path)) and words in str(e.value), str(e.value)


def test_the_example_names_a_bad_file_before_starting_processes(local, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"txt": "w3"}\n')
    res = subprocess.run([sys.executable, EXAMPLE, "--model", local["model"], "--data", local["jsonl"], str(bad)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and f'{bad} line 2: no "text" field' in res.stderr, res.stderr[-2000:]
    assert "memo launch" not in res.stderr, "refused before relaunching as 2 processes"
    res = subprocess.run([sys.executable, EXAMPLE, "--data", local["jsonl"]], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "--data needs --model" in res.stderr


@pytest.mark.parametrize("dtype", ["bf16"])
def test_train_a_local_pretrained_model_on_packed_text(local, tmp_path, dtype):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "memo.cli.main", "launch", "--config_file", CONFIG, EXAMPLE, "--out", str(out),
           "--model", local["model"], "--dtype", dtype, "--data", local["jsonl"], local["txt"],
           "--seq-len", "128", "--batch-size", "2", "--max-steps", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["world"] == 2 and summary["sequence_parallel"] == 2 and summary["steps"] == 3
    vocab = len(local["tokenizer"])
    assert summary["chance_loss"] == pytest.approx(math.log(vocab)) and summary["final_accuracy"] is None
    losses = [h["loss"] for h in summary["history"]]
    # An untrained model on its own vocabulary: about ln(vocab) per token (bf16: a few percent).
    assert all(math.isfinite(x) and abs(x - math.log(vocab)) < 0.5 for x in losses), losses
    assert all(h["swapped_bytes"] > 0 for h in summary["history"])
    assert summary["args"]["model"] == local["model"] and summary["args"]["dtype"] == dtype
