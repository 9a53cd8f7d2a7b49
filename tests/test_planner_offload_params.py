"""Parameter offload in the planner (``memo plan --offload-params``: ZeRO-3 with the weights on the host,
DeepSpeed's ``offload_param``): the model-state bytes and the step-time terms against hand-computed
values (NOTE [ Parameter offload ] and NOTE [ Step-time model ] rule 9 in planner/cost.py), Llama-3-8B at
512K tokens on one H100, the plan file and the refusals."""

import copy
import json

import pytest

from memo.cli.main import main
from memo.planner.cost import get_gpu, model_state_bytes, step_time
from memo.planner.planfile import PlanFileError, load_plan, plan_offload_params
from memo.planner.presets import get_preset
from memo.planner.search import what_limits

GIB = 1 << 30
# Llama-3-8B by hand: a layer is q, o (4096 x 4096), k, v (4096 x 1024), gate, up, down (4096 x 14336) and two
# norms; the embedding and the LM head are 128256 x 4096 each, the final norm 4096.
LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096      # 218,112,000
VOCAB_HIDDEN = 128256 * 4096                                                    # 525,336,576
P = 32 * LAYER + 2 * VOCAB_HIDDEN + 4096                                        # 8,030,261,248
REST = P - 32 * LAYER                                                           # embedding, head, final norm


def test_state_bytes_hand_computed():
    m = get_preset("llama3-8b")
    assert LAYER == 218_112_000 and P == 8_030_261_248
    one = model_state_bytes(m, zero_stage=3, ranks=1, offload_optimizer=True, offload_params=True)
    # Device: no weights; two of the largest gathered module (the LM head, larger than a layer) and one
    # module's bf16 gradients. Host: bf16 weights + fp32 gradients + fp32 master, momentum, variance.
    assert one == {"parameters": P, "weights": 0, "zero3_gather": 2 * 2 * VOCAB_HIDDEN, "gradients": 2 * VOCAB_HIDDEN,
                   "optimizer": 0, "device_total": 6 * VOCAB_HIDDEN, "host": 18 * P}
    assert one["device_total"] == 3_152_019_456 and one["host"] == 144_544_702_464
    eight = model_state_bytes(m, zero_stage=3, ranks=8, offload_optimizer=True, offload_params=True)
    assert eight["host"] == 18 * P // 8 and eight["device_total"] == one["device_total"]
    # Without it one GPU holds all weights and gradients (plus the gather buffer of two layers).
    kept = model_state_bytes(m, zero_stage=3, ranks=1, offload_optimizer=True)
    assert kept["device_total"] == 2 * P + 2 * P + 2 * 2 * LAYER and kept["host"] == 16 * P
    for stage, offload in ((1, True), (2, True), (3, False)):
        with pytest.raises(ValueError, match="--offload-params needs ZeRO stage 3 and --offload-optimizer"):
            model_state_bytes(m, zero_stage=stage, ranks=1, offload_optimizer=offload, offload_params=True)


def _step(gpu, *, offload_params, seq_len=8192, swap=0.0):
    return step_time(get_preset("llama3-8b"), gpu, seq_len=seq_len, micro_batch=1, sp=1, gpus=1, gpus_per_node=1,
                     alpha=1.0, swap_bytes_fixed=swap, swap_bytes_other=0.0, keep_layers=2, zero_stage=3,
                     offload_optimizer=True, offload_params=offload_params)


def test_step_time_terms_hand_computed():
    """A link chosen so that a layer's weights take longer than its forward and less than its backward, its
    gradients longer than its backward, and memo's prefetch (twice the backward) fills the host-to-device
    direction: each exposure rule shows, in its own regime."""
    base = _step(get_gpu("a800"), offload_params=False)     # a800: no element-wise passes, times fixed by FLOPs
    t_fwd, t_bwd = base.layer_forward_s, base.layer_backward_s
    link = 2 * LAYER / ((t_fwd + t_bwd) / 2)
    gpu = get_gpu("a800", host_link_Bps=link)
    w, g = 2 * LAYER / link, 4 * LAYER / link
    assert t_fwd < w < t_bwd < g
    on = _step(gpu, offload_params=True, swap=2 * t_bwd * link)
    off = _step(gpu, offload_params=False, swap=2 * t_bwd * link)
    assert (on.layer_forward_s, on.layer_backward_s) == (t_fwd, t_bwd)
    assert on.param_copy_s == pytest.approx(w) and on.grad_copy_s == pytest.approx(g)
    # Forward: w - t_fwd per layer. Gradients: g - t_bwd per layer. Backward weights: behind memo's prefetch,
    # which alone fills the direction, all of w in each of the 30 swapped layers; the 2 kept layers copy
    # nothing and w < t_bwd hides. Embedding + head + norm: weights twice and fp32 gradients, unhidden.
    exposed = 32 * (w - t_fwd) + 32 * (g - t_bwd) + 30 * w + (2 * 2 + 4) * REST / link
    assert on.param_offload_exposed_s == pytest.approx(exposed, rel=1e-9)
    # The optimizer step moves nothing with the weights on the host: CPU Adam only.
    assert on.optimizer_s == pytest.approx(P / 1e9)
    assert off.optimizer_s == pytest.approx(6 * P / link + P / 1e9) and off.param_offload_exposed_s == 0
    assert on.step_time_s - off.step_time_s == pytest.approx(exposed + on.optimizer_s - off.optimizer_s, rel=1e-9)


def test_step_time_hidden_at_long_lengths():
    """At 512K tokens a layer computes for seconds and its weights move in 8 ms on an H100's 53 GB/s: only the
    modules outside the layers are exposed."""
    h100 = get_gpu("h100")
    on = _step(h100, offload_params=True, seq_len=512 << 10, swap=4 * GIB)
    assert on.param_copy_s == pytest.approx(2 * LAYER / 53e9) and on.param_copy_s < 0.01 < on.layer_forward_s
    assert on.param_offload_exposed_s == pytest.approx(8 * REST / 53e9)


@pytest.fixture(scope="module")
def plan_512k(tmp_path_factory):
    import contextlib
    import io
    path = tmp_path_factory.mktemp("offload") / "plan.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", "--model", "llama3-8b", "--gpu", "h100", "--seq-len", "512K", "--gpus", "1", "--sp", "1",
                     "--host-memory", "1TiB", "--offload-optimizer", "--offload-params", "--no-mip", "--json",
                     "--out", str(path)])
    return code, json.loads(out.getvalue()), err.getvalue(), path


def test_512k_on_one_h100_fits_with_the_weights_on_the_host(plan_512k):
    code, plan, err, path = plan_512k
    assert code == 0 and plan["fits"], err
    assert (plan["zero_stage"], plan["offload_optimizer"], plan["offload_params"]) == (3, True, True)
    st = plan["model_states"]
    assert (st["weights"], st["gradients"], st["zero3_gather"]) == (0, 2 * VOCAB_HIDDEN, 4 * VOCAB_HIDDEN)
    live = plan["step"]["live_at_peak"]
    # One gradient buffer for the whole step, no per-layer gradients (NOTE [ Level-2 step timeline ] rule 7).
    assert live["gradients"] == 2 * VOCAB_HIDDEN and not any(k.endswith(".grad") for k in live)
    assert plan["predicted"]["device_peak_bytes"] <= 80 * GIB and plan["predicted"]["mfu"] >= 0.30
    assert plan["predicted"]["host_bytes_per_rank"] >= 18 * P
    loaded = load_plan(str(path))
    assert plan_offload_params(loaded) and loaded["offload_params"] is True


def test_what_limits_names_parameter_offload(plan_512k):
    plan = copy.deepcopy(plan_512k[1])
    plan["fits"], plan["reasons"] = False, ["device peak exceeds the GPU"]
    lim = what_limits(plan)
    assert lim["kind"] == "device arena" and lim["offload_params"] is True
    assert "parameters offloaded: the ZeRO-3 gather buffer and one module's gradients" in lim["detail"]
    plan["offload_params"] = False
    lim = what_limits(plan)
    assert lim["offload_params"] is False and "--offload-params (ZeRO-3, --offload-optimizer) moves" in lim["detail"]


@pytest.mark.parametrize("change,match", [
    ({"offload_params": "yes"}, "offload_params 'yes' is not true or false"),
    ({"zero_stage": 1}, "offload_params needs zero_stage 3 and offload_optimizer, the plan has zero_stage 1"),
    ({"offload_optimizer": False}, "offload_optimizer False; make it again .* --offload-optimizer --offload-params"),
    ({"zero_stage": 7}, "zero_stage 7 is not 0, 1, 2 or 3"),
])
def test_plan_file_refuses_bad_offload_fields(plan_512k, tmp_path, change, match):
    bad = dict(plan_512k[1], **change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PlanFileError, match=match):
        load_plan(str(path))


@pytest.mark.parametrize("argv,match", [
    ([], "--offload-params needs --offload-optimizer and ZeRO stage 3 .* add --offload-optimizer$"),
    (["--offload-optimizer", "--zero-stage", "1"], "add --zero-stage 3 \\(or drop --zero-stage\\)$"),
    (["--zero-stage", "2"], "add --offload-optimizer and --zero-stage 3"),
])
def test_cli_refuses_parameter_offload_without_its_needs(capsys, argv, match):
    import re
    code = main(["plan", "--model", "llama3-8b", "--seq-len", "64K", "--gpus", "1", "--host-memory", "1TiB",
                 "--offload-params", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memo.plan: ") and re.search(match, err.strip()), err
