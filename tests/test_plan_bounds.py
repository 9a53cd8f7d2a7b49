"""`memo plan` refuses absurd input quickly, in bounded memory, before it profiles anything (issue 18
item 5): model sizes beyond NOTE [ Bounded model sizes ], numeric flags that are zero, negative, nan or
infinite, more tokens or MLP tiles per rank than NOTE [ Bounded plan flags ] allows, binary or huge
config and plan files.

All cases run in ONE child process under a 2 GiB address-space limit (RLIMIT_AS) and a 120 s
timeout: before these checks a config with 10**9 layers grew past 23 GB, and a --seq-len of 10**15
tokens profiled for minutes. Each case's wall time is measured in the child.
"""

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

LIMIT_BYTES = 2 << 30

DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, time
    from memo.cli.main import main
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["plan", *argv])
        out.append({"code": code, "err": err.getvalue(), "s": time.perf_counter() - t0})
    print(json.dumps(out))
""")


def _run_bounded(cases: list) -> list:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _config(path, **over):
    cfg = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    cfg.update(over)
    path.write_text(json.dumps(cfg))
    return str(path)


M7 = ["--model", "memo-paper-7b", "--seq-len", "64K", "--host-memory", "2TiB", "--time-limit", "5"]


def test_absurd_input_is_refused_quickly_in_bounded_memory(tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:          # sparse: 65 MiB of zeros on disk cost nothing
        f.truncate(65 << 20)
    plan_bomb = tmp_path / "plan.json"
    from memo.planner.plan import PLAN_VERSION
    from memo.planner.presets import get_preset, identity_of
    plan_bomb.write_text(json.dumps({   # the fields the schema checks before the model's numbers
        "memo_plan_version": PLAN_VERSION, "model": dict(identity_of(get_preset("llama3-8b")), layers=10**9),
        "seq_len": 4096, "micro_batch": 1, "dtype": "bf16", "sp": 1, "alpha": 0.5, "fits": True, "predicted": {},
        "layer": {}, "step": {}, "layer_policies": ["memo"] * 1000}))
    small = ["--seq-len", "4K", "--gpus", "1", "--host-memory", "64GiB", "--no-mip"]
    cases = [  # (argv, words in the message)
        (["--model", _config(tmp_path / "l.json", num_hidden_layers=10**9), *small],
         ["l.json", "layers = 1,000,000,000 exceeds memo's bound of 256"]),
        (["--model", _config(tmp_path / "h.json", hidden_size=10**9), *small], ["hidden = 1,000,000,000 exceeds"]),
        (["--model", _config(tmp_path / "v.json", vocab_size=10**12), *small], ["vocab = 1,000,000,000,000 exceeds"]),
        (["--model", _config(tmp_path / "a.json", num_attention_heads=10**6, num_key_value_heads=10**6), *small],
         ["heads = 1,000,000 exceeds memo's bound of 1,024"]),
        (["--model", _config(tmp_path / "i.json", intermediate_size=10**9), *small], ["intermediate = 1,000,000,000"]),
        (["--model", _config(tmp_path / "g.json", num_attention_heads=6, num_key_value_heads=4), *small],
         ["6 attention heads are not a multiple of 4 kv heads"]),
        (["--model", str(binary), *small], ["binary.json", "is not UTF-8 text (byte 0x89 at offset 0)"]),
        (["--model", str(huge), *small], ["huge.json", "is larger than 16,777,216 bytes"]),
        (["--from-plan", str(binary)], ["plan file", "binary.json", "is not UTF-8 text"]),
        (["--from-plan", str(huge)], ["plan file", "huge.json", "is larger than 67,108,864 bytes"]),
        (["--from-plan", str(plan_bomb)],
         ["plan file", "plan.json", "model: layers = 1,000,000,000 exceeds memo's bound of 256"]),
        (M7 + ["--gpus-per-node", "0"], ["--gpus-per-node 0 must be an integer from 1 to 1,048,576"]),
        (M7 + ["--gpus", "0"], ["--gpus 0 must be"]),
        (M7 + ["--gpus", "8", "--sp", "0"], ["--sp 0 must be an integer from 1 to --gpus (8)"]),
        (M7 + ["--micro-batch", "0"], ["--micro-batch 0 must be"]),
        (M7 + ["--loss-chunk", "0"], ["--loss-chunk 0 must be an integer from 1"]),
        (M7 + ["--pcie", "0GB/s"], ["--pcie 0GB/s must be a positive finite number"]),
        (M7 + ["--nvlink", "0"], ["--nvlink 0 must be a positive finite number"]),
        (M7 + ["--inter-node", "0GB/s"], ["--inter-node 0GB/s must be a positive"]),
        (M7 + ["--pcie", "9" * 400 + "GB/s"], ["is not a finite number"]),
        (M7 + ["--peak-tflops", "nan"], ["--peak-tflops nan must be a positive finite number"]),
        (M7 + ["--peak-tflops", "inf"], ["--peak-tflops inf must be a positive finite number"]),
        (M7 + ["--peak-tflops", "-1"], ["--peak-tflops -1.0 must be a positive finite number"]),
        (M7 + ["--gpu-memory", "0"], ["--gpu-memory 0 must be a positive finite number"]),
        (["--model", "memo-paper-7b", "--seq-len", "64K", "--host-memory", "0"], ["--host-memory 0 must be positive"]),
        (M7 + ["--time-limit", "nan"], ["--time-limit nan must be positive seconds"]),
        (M7 + ["--time-limit", "inf"], ["--time-limit inf must be positive seconds"]),
        (["--model", "memo-paper-7b", "--seq-len", "1000000G", "--host-memory", "2TiB"],
         ["tokens per rank; memo plan plans at most 8,388,608 (8M) per rank"]),
        (["--model", "memo-paper-7b", "--seq-len", "1M", "--gpus", "1", "--host-memory", "2TiB", "--tile-tokens", "1"],
         ["--tile-tokens 1 splits each rank's 1,048,576 tokens into 1,048,576 MLP tiles", "--tile-tokens 512 or more"]),
    ]
    results = _run_bounded([argv for argv, _ in cases])
    for (argv, words), r in zip(cases, results):
        assert r["code"] == 2, (argv, r)
        assert r["err"].startswith("memo.plan: ") and "Traceback" not in r["err"], (argv, r["err"])
        for w in words:
            assert w in r["err"], (argv, w, r["err"])
        assert "profiled one" not in r["err"], (argv, r["err"])   # refused before the profile
        assert r["s"] < 10, (argv, r["s"])


def test_flags_at_their_limits_still_plan(capsys):
    """The checks refuse only what is absurd: --reserve 0, a tile as large as the sequence and a model at
    the bounds' edges' neighbours still plan."""
    from memo.cli.main import main
    code = main(["plan", "--model", "memo-paper-7b", "--seq-len", "64K", "--host-memory", "2TiB", "--time-limit", "5",
                 "--reserve", "0", "--tile-tokens", "64K", "--no-mip", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["fits"] is True


@pytest.mark.parametrize("model", [{"layers": 256, "hidden": 1 << 17, "intermediate": 1 << 20, "heads": 1024,
                                    "kv_heads": 1024, "head_dim": 1 << 14, "vocab": 1 << 24}])
def test_model_bounds_are_inclusive(model):
    from memo.planner.presets import MODEL_BOUNDS, ModelBoundsError, check_model_bounds
    assert model == MODEL_BOUNDS
    check_model_bounds(dict(model, model_type="llama"), "x")
    for key in MODEL_BOUNDS:
        with pytest.raises(ModelBoundsError, match=f"{key} = "):
            check_model_bounds(dict(model, model_type="llama", **{key: MODEL_BOUNDS[key] + 1}), "x")
