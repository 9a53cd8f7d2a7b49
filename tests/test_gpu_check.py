"""benchmarks/gpu_check.py: the CPU's share of the GPU checks (--device cpu --tiny), the refusal
without a GPU, and the kernel-to-layer attribution its GPU timing check relies on.

The script runs in this process (``main(argv)``, the function its command line calls): a
subprocess would pay ~8 s of imports on this machine for the same code path."""

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (imported by the suite anyway: not this test's time)
from models import AllocatesInBackward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)   # not through sys.path: benchmarks/copy.py would shadow `copy`


def test_cpu_tiny_run_passes_what_the_cpu_can_check(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny shapes: intra-op threads only add contention on 2 shared cores
    try:
        code = gpu_check.main(["--device", "cpu", "--tiny", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    checks = data["checks"]
    assert data["exit_code"] == 0 and data["meta"]["device"] == "cpu"
    assert {n: c["status"] for n, c in checks.items()} == {
        "dma_copies": "PASS", "fp32_gqa": "PASS", "bf16_quality": "SKIP", "sdpa_kernels": "SKIP",
        "event_timing": "PASS", "planned_memory": "SKIP"}, printed
    for name, c in checks.items():
        assert f"{c['status']} {name}: " in printed and not c["failures"]
        assert c["status"] != "SKIP" or c["reason"].startswith("needs a GPU: ")

    cases = checks["dma_copies"]["figures"]["cases"]
    assert len(cases) == 4 * 2 * 3          # layouts x dtypes x slices
    for case in cases:
        assert case["dma"] and case["pack_exact"] and case["unpack_exact"], case
        native = data["meta"]["csrc"]["active"]
        assert list(case["d2h_counted"]) == ["host_pack_bytes" if native else "torch_fallback_bytes"], case
    native = data["meta"]["csrc"]["active"]
    pageable = checks["dma_copies"]["figures"]["pageable_cases"]
    assert len(pageable) == 4 and all(x["pack_exact"] and x["unpack_exact"] and x["dma"] for x in pageable)
    kernel = checks["dma_copies"]["figures"]["kernel_case"]   # a layout the plan sends to the kernel
    assert not kernel["dma"] and kernel["pack_exact"] and kernel["unpack_exact"], kernel
    assert kernel["d2h_counted"] == {"host_pack_bytes" if native else "torch_fallback_bytes": kernel["bytes"]}
    assert checks["dma_copies"]["figures"]["bandwidth"].startswith("skipped")

    gqa = checks["fp32_gqa"]["figures"]
    # The CPU flash kernel takes grouped heads: it gets the 2 k/v heads, not repeated ones.
    assert gqa["attention_kernels"] == {"aten._scaled_dot_product_flash_attention_for_cpu.default": [2]}
    assert gqa["worst_param_error_ratio"] <= 2.0 and gqa["recomputed_bytes"] > 0 and gqa["swapped_bytes"] > 0

    timing = checks["event_timing"]["figures"]
    assert timing["timing_source"] == "host clock" and timing["auto_settled"]
    assert [x["layer"] for x in timing["layers"]] == [0, 1, 2]
    assert all(x["forward_s_memo"] > 0 and x["rel_diff"] <= 0.2 for x in timing["layers"]), timing["layers"]
    assert timing["swap_ratio_decisions"][0]["phase"] == "warm-up"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_default_run_exits_2_and_says_why(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--json", str(out)]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["exit_code"] == 2 and "--device cpu --tiny" in data["reason"] and data["checks"] == {}


def _event(id, name, parent=None, device=False, linked=0, stream=0, start_us=0.0, end_us=0.0):
    """The fields of torch.autograd.profiler_util.FunctionEvent the attribution reads."""
    return SimpleNamespace(id=id, name=name, cpu_parent=parent, linked_correlation_id=linked,
                           device_type="DeviceType.CUDA" if device else "DeviceType.CPU", device_resource_id=stream,
                           time_range=SimpleNamespace(start=start_us, end=end_us))


def test_layer_kernel_spans_follow_launching_ops_to_their_layer():
    mark = gpu_check.LAYER_MARK
    layer0, layer1 = _event(1, f"{mark}0"), _event(2, f"{mark}1")
    mm0 = _event(3, "aten::mm", parent=_event(4, "aten::linear", parent=layer0))
    attn1 = _event(5, "aten::_scaled_dot_product_cudnn_attention", parent=layer1)
    outside = _event(6, "aten::add")
    events = [layer0, layer1, mm0, attn1, outside, mm0.cpu_parent,
              # kernels (compute stream 7): layer 0 from 100 to 400 us with a gap; layer 1 1000-3000 us
              _event(3, "gemm", device=True, linked=3, stream=7, start_us=100, end_us=200),
              _event(9, "gemm", device=True, linked=3, stream=7, start_us=300, end_us=400),
              _event(10, "cudnn_attn", device=True, linked=5, stream=7, start_us=1000, end_us=3000),
              # a copy on another stream launched inside layer 1, and a kernel outside every layer
              _event(11, "Memcpy DtoH", device=True, linked=5, stream=30, start_us=1000, end_us=1500),
              _event(12, "add_kernel", device=True, linked=6, stream=7, start_us=5000, end_us=9000)]
    spans = gpu_check.layer_kernel_spans(events)
    assert spans == {0: {"span_s": pytest.approx(300e-6), "busy_s": pytest.approx(200e-6), "kernels": 2, "stream": 7},
                     1: {"span_s": pytest.approx(2000e-6), "busy_s": pytest.approx(2000e-6), "kernels": 1, "stream": 7}}


def test_phase_probe_counts_phases_and_hits_per_phase_and_passes_calls_through(monkeypatch):
    from memo import _ext
    from memo.arena import ArenaPlan, ArenaReplay
    if _ext._module is None:
        pytest.skip(f"memo._C not built: {_ext._load_error}")
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")
    from memo.planned_memory import LayerPhases

    arena = ArenaReplay(ArenaPlan(arena_bytes=512, phases=[[], [(0, 512)]]))
    phases = LayerPhases(arena)
    probe = phases.arena = gpu_check.PhaseProbe(arena, arena.stats)
    h = torch.ones(4, requires_grad=True)
    for w in [torch.nn.Parameter(torch.full((4,), 1.5)) for _ in range(3)]:
        with phases.forward(h) as outputs:
            outputs.append(AllocatesInBackward.apply(h * w, arena) + h)
        h = outputs[0]
    h.sum().backward()
    assert probe.begins == {"forward": 3, "backward": 3} and probe.current is None
    assert probe.hits == {"forward": 0, "backward": 3} == {"forward": 0, "backward": arena.stats()["hits"]}


def test_stderr_problems_names_cuda_errors_and_escaped_exceptions_only():
    stderr = ("UserWarning: a deterministic kernel is unavailable\n"
              "terminate called after throwing an instance of 'c10::Error'\n"
              "memo.arena: freeing 0x7f00 (512 B) on device 0 failed: CUDA error: driver shutting down\n")
    assert gpu_check.stderr_problems(stderr) == stderr.splitlines()[1:]
    assert gpu_check.stderr_problems("UserWarning: something else\n") == []
