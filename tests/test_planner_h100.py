"""`memo plan` against what memo measured on one H100 (issue 8, item 7).

Reference data: memo's measured H100 run of 2026-11-22 (benchmarks/gpu_step.py):
forward + backward step time and ``torch.cuda.max_memory_allocated`` of memo at swap ratio 0,
batch 1, bf16, memo's chunked loss (4096 tokens), no optimizer step. Compared as RESULTS.md's
last table compares them: the predicted step time minus the predicted optimizer time, and the
planned step peak (Level 2, no runtime reserve) minus the optimizer states on the device.
The constants behind the predictions: NOTE [ Measured H100 constants ] in planner/cost.py.
"""

import json

import pytest

from memo.cli.main import main

GIB = 1 << 30
TINYLLAMA = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}

# (model, tokens, extra flags, measured step s, measured peak GiB) from RESULTS.md.
MEASURED = [
    ("tinyllama", "32K", [], 1.588, 10.3),
    ("tinyllama", "128K", [], 15.72, 29.6),
    ("llama2-7b", "32K", ["--offload-optimizer"], 5.563, 37.7),   # Adam states would not fit
    ("llama2-7b", "64K", ["--offload-optimizer"], 14.62, 51.2),
]
TIME_TOLERANCE, PEAK_TOLERANCE = 0.15, 0.10    # the targets


@pytest.fixture(scope="module")
def tinyllama_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("h100") / "config.json"
    path.write_text(json.dumps(TINYLLAMA))
    return str(path)


@pytest.mark.parametrize("model,tokens,extra,step_s,peak_gib", MEASURED,
                         ids=[f"{m}-{t}" for m, t, *_ in MEASURED])
def test_plan_predicts_the_measured_h100_step(capsys, tinyllama_config, model, tokens, extra, step_s, peak_gib):
    spec = tinyllama_config if model == "tinyllama" else model
    # Greedy layouts: on these layers they equal the lower bound, as the MIP's do (and take no time).
    # What those runs ran: untiled MLP, the last two layers kept, MEMO's policy on the others.
    code = main(["plan", "--model", spec, "--seq-len", tokens, "--gpus", "1", "--sp", "1", "--gpu", "h100",
                 "--host-memory", "1TiB", "--swap-ratio", "0", "--json", "--no-mip", "--tile-tokens", "none",
                 "--keep-layers", "2", "--policy", "memo", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out)
    assert plan["fits"] and plan["alpha"] == 0.0
    predicted_s = plan["predicted"]["step_time_s"] - plan["predicted"]["times"]["optimizer_s"]
    predicted_peak = plan["step"]["peak_bytes"] - plan["model_states"]["optimizer"]
    assert predicted_s == pytest.approx(step_s, rel=TIME_TOLERANCE), (predicted_s, step_s)
    assert predicted_peak == pytest.approx(peak_gib * GIB, rel=PEAK_TOLERANCE), (predicted_peak / GIB, peak_gib)
