"""One saved-tensor classifier for the runtime and the planner (NOTE [ Saved tensor classes ] rule 6).

The runtime's classes (``memo.trace.trace_layer``, which the swap executor's records follow) and the
planner's (``memo.profile``: ``profile_layer_saved`` and ``profile_model`` behind ``memo plan``) are
compared per saved tensor with each other and with an oracle that shares no code with them: a
plain run of the same layer whose saved tensors are matched by storage address against the
parameters, the input, RoPE's cos/sin and the tensors autograd's SDPA node keeps as its output
and log-sum-exp. Agreement alone would not catch a wrong shared rule; the oracle does.
"""

import pytest
import torch

from memo.profile import profile_layer_saved, profile_model
from memo.trace import LayerCall, SavedClass, trace_layer
from models import planner_layer
from test_profile import SMALL

SEQ, BATCH = 16, 2
CLASS_OF_KIND = {"param": SavedClass.PARAM, "layer_input": SavedClass.INPUT, "shared": SavedClass.SHARED,
                 "attention_output": SavedClass.ATTN_OUT, "lse": SavedClass.ATTN_OUT, "other": SavedClass.OTHER}


def _layer(model: dict):
    return planner_layer(model, BATCH, SEQ)


def _oracle_kinds(layer, x, shared) -> list[str]:
    """The planner's label of each saved tensor, from storage addresses and the autograd graph."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = layer(x) if shared is None else layer(x, attention_mask=None, position_embeddings=shared)
    out = res[0] if isinstance(res, tuple) else res
    attention = {}
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ScaledDotProduct" in node.name():
            attention[node._saved_output.untyped_storage().data_ptr()] = "attention_output"
            attention[node._saved_logsumexp.untyped_storage().data_ptr()] = "lse"
        stack.extend(f for f, _ in node.next_functions)
    assert set(attention.values()) == {"attention_output", "lse"}, "the layer ran no fused SDPA kernel"
    params = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    shared_ptrs = {t.untyped_storage().data_ptr() for t in shared or ()}
    x_ptr = x.untyped_storage().data_ptr()
    return ["param" if p in params else "layer_input" if p == x_ptr else "shared" if p in shared_ptrs
            else attention.get(p, "other") for p in saved]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_runtime_and_planner_classify_every_saved_tensor_alike(family):
    model = SMALL[family]
    layer, x, shared = _layer(model)
    expected = _oracle_kinds(layer, x, shared)
    assert {"param", "layer_input", "attention_output", "lse", "other"} <= set(expected)
    assert ("shared" in expected) == (shared is not None)
    expected_classes = [CLASS_OF_KIND[k] for k in expected]

    kwargs = {} if shared is None else {"attention_mask": None, "position_embeddings": shared}
    runtime = [info.cls for info in trace_layer(layer.forward, layer, LayerCall(x, (), kwargs)).saved]
    planner, _ = profile_layer_saved(layer, x, shared)
    got = {"runtime": runtime, "planner": [SavedClass(s["class"]) for s in planner]}
    assert got == {"runtime": expected_classes, "planner": expected_classes}
    assert [s["kind"] for s in planner] == expected
    # memo plan's profile (its own layer, fake tensors) labels the same layer's saved tensors alike.
    profiled = profile_model(model, seq_len=SEQ, micro_batch=BATCH, dtype="fp32", loss_chunk=None)
    assert [s["kind"] for s in profiled.saved] == expected


@pytest.mark.parametrize("kind", ["zero3", "dtensor", "fsdp2_bf16"])
def test_a_layer_holding_only_its_shards_traces_as_the_whole_layer(kind):
    """NOTE [ Tracing a layer whose weights are sharded ]: memo traces layers other than the running one
    when it sizes the host pool; under ZeRO-3 (``param.data`` empty, ``ds_shape`` whole) or FSDP2 (a
    DTensor) such a layer holds only its shard. Its trace must be the whole layer's, and the layer's
    parameters must be its own again afterwards."""
    import copy
    model = SMALL["llama"]
    layer, x, shared = _layer(model)
    kwargs = {"attention_mask": None, "position_embeddings": shared}
    sharded = copy.deepcopy(layer)
    if kind == "fsdp2_bf16":   # FSDP2 keeps fp32 shards and computes in bf16: the trace is the bf16 layer's
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
        kwargs["position_embeddings"] = tuple(t.to(torch.bfloat16) for t in shared)
    whole = trace_layer(layer.forward, layer, LayerCall(x, (), kwargs)).saved
    if kind == "zero3":   # the state ZeRO-3 leaves a parameter in outside its module's forward
        for i, p in enumerate(sharded.parameters()):
            p.ds_shape, p.ds_id, p.ds_tensor = p.shape, i, p.data.flatten()[: p.numel() // 2].clone()
            p.data = torch.empty(0, dtype=p.dtype)
    else:   # a 1-rank mesh: the DTensor's local shard is the whole tensor, its type is what matters
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.device_mesh import init_device_mesh
        import torch.distributed as dist
        from distributed import free_port
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        if kind == "fsdp2_bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            fully_shard(sharded, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
            assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in sharded.parameters())
        else:
            for m in sharded.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = torch.nn.Parameter(DTensor.from_local(p.data, mesh, [Replicate()]))
    before = {n: p for n, p in sharded.named_parameters()}
    try:
        got = trace_layer(sharded.forward, sharded, LayerCall(x, (), kwargs)).saved
    finally:
        if kind != "zero3":
            dist.destroy_process_group()
    assert [(s.cls, s.shape, s.dtype) for s in got] == [(s.cls, s.shape, s.dtype) for s in whole]
    assert all(p is before[n] for n, p in sharded.named_parameters())
