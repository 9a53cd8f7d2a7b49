"""What a decoder layer saves for backward, and where each saved tensor keeps its tokens.

The executor needs, for every tensor a layer saves, its class (parameter, shared argument, layer
input, attention output, other) and its token dimension. Both are found from layout, never by
guessing from sizes: the layer is run under ``FakeTensorMode`` (no memory) on the real call and on
a shorter prefix of it, and the dimensions whose size changed are the token dimensions.

# NOTE [ Saved tensor classes ]
#
# 1. PARAM: shares storage with a parameter or buffer of the layer (e.g. ``weight.t()``). Never
#    swapped, never counted as an activation.
# 2. SHARED: shares storage with a tensor argument of the layer call other than the hidden states
#    (RoPE cos/sin, masks, position ids). Every layer saves them again; they are kept once, by
#    reference, never swapped per layer.
# 3. INPUT: shares storage with the layer's hidden-states input. Swapped in full.
# 4. ATTN_OUT: shares storage with an output of the attention kernel (output, log-sum-exp, RNG
#    state). Swapped in full: attention is never recomputed.
# 5. OTHER: everything else. Built from INPUT and ATTN_OUT by per-token operations, so the last
#    ``alpha`` share of its tokens is swapped and the rest recomputed. An OTHER tensor with no
#    token dimension, or with two (an S x S mask built inside attention), is swapped in full.
# 6. One classifier (``Classifier``) decides for the runtime (memo.executor, memo.runtime,
#    ``trace_layer``) and for the planner (memo.profile); the planner's labels are a function of
#    the class (``Classifier.kind``): ATTN_OUT is split by the position of the tensor among the
#    kernel's outputs, ``attention_output`` (position 0) and ``lse`` (the rest: log-sum-exp, and
#    on CUDA the RNG state), all swapped in full. The profiler labels the kernel's allocations
#    with the same function (``attention_output_kind``).

# NOTE [ Pack returns a detached tensor ]
#
# A pack hook that returns its argument itself makes a reference cycle when the tensor is an
# output of the node saving it (rsqrt, exp and SDPA save their results): node -> packed object
# -> tensor -> grad_fn -> node, through C++ where Python's collector cannot see it, so the graph
# of a forward without backward would never be freed. Every memo pack hook that keeps a tensor
# returns ``t.detach()``: same storage and values, no grad_fn.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memo.attention.op  # noqa: F401  (registers torch.ops.memo.sp_attention)
from memo.errors import MemoError

aten = torch.ops.aten

# Attention kernels whose outputs are ATTN_OUT and which recomputation replays instead of running.
# memo.sp_attention is ring / Ulysses / hybrid sequence-parallel attention as one op: replaying it
# also means recomputation sends no message.
ATTENTION_KERNELS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.memo.sp_attention.default,
}
# Token dimension of the kernels' (output, lse) in (batch, heads, seq, ...) layout.
KERNEL_TOKEN_DIM = 2


class SavedClass(enum.Enum):
    PARAM = "param"
    SHARED = "shared"
    INPUT = "input"
    ATTN_OUT = "attn_out"
    OTHER = "other"


# The planner's label of each class but ATTN_OUT (memo.profile, planner/). See NOTE [ Saved tensor classes ] rule 6.
PLANNER_KINDS = {SavedClass.PARAM: "param", SavedClass.SHARED: "shared", SavedClass.INPUT: "layer_input",
                 SavedClass.OTHER: "other"}


def attention_output_kind(position: int) -> str:
    """The planner's label of output ``position`` of an attention kernel (NOTE [ Saved tensor classes ] rule 6)."""
    return "attention_output" if position == 0 else "lse"


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage; equal for all views of one storage (fake tensors too)."""
    return t.untyped_storage()._cdata


def view_key(t: torch.Tensor) -> tuple:
    """Identity of a view: same storage, same geometry."""
    return (storage_key(t), tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)


@dataclass(frozen=True)
class TokenLayout:
    """Where a saved tensor keeps its tokens.

    ``dim`` is the token dimension after ``unflatten`` (None: no single token dimension).
    ``flat_batch``: dimension ``dim - 1`` of the saved tensor is ``batch * seq`` flattened (as
    ``matmul`` folds ``(b, s, h)`` to ``(b*s, h)``); it is unflattened to ``(b, s)`` first.
    """

    dim: Optional[int]
    flat_batch: bool = False

    def tokens_view(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """``t`` viewed so that dimension ``self.dim`` indexes tokens."""
        if self.flat_batch:
            return t.unflatten(self.dim - 1, (batch, -1))
        return t


@dataclass(frozen=True)
class SavedInfo:
    """One tensor a layer saves: class, geometry, token layout and storage group."""

    index: int
    cls: SavedClass
    shape: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype
    layout: TokenLayout
    group: int          # index of the first saved tensor sharing this storage

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def extent(shape, stride, offset) -> tuple[int, int]:
    """Elements ``[lo, hi)`` of its storage that a view touches."""
    if _numel(shape) == 0:
        return offset, offset
    return offset, offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))


def is_dense(shape, stride) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    dims = sorted((s, n) for n, s in zip(shape, stride) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


class LayerCall:
    """The arguments of one decoder-layer call, sliceable along the token dimension.

    hidden_states: (batch, seq, hidden). Known tensor keyword arguments: ``position_embeddings``
    (cos, sin), each (batch or 1, seq, head_dim); ``position_ids`` (batch or 1, seq);
    ``attention_mask`` None or (batch, 1, seq, seq). Scalars (0-dim tensors such as
    ``num_items_in_batch``) pass through unsliced. Any other tensor argument is refused, since memo
    would not know how to slice it for recomputation.
    """

    def __init__(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if hidden_states.dim() != 3:
            raise MemoError(f"memo.trace: decoder layer input has shape {tuple(hidden_states.shape)}, expected "
                            f"(batch, seq, hidden); memo supports HF decoder-only layers")
        if any(isinstance(a, torch.Tensor) for a in args):
            raise MemoError("memo.trace: decoder layer got extra positional tensor arguments; memo needs them "
                            "as keywords (attention_mask=..., position_embeddings=...)")
        for name, value in kwargs.items():
            if name in ("position_embeddings", "position_ids", "attention_mask", "past_key_values", "cache"):
                continue
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                continue   # a scalar (num_items_in_batch, which HF hands to every layer): not per token
            if isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and any(
                    isinstance(v, torch.Tensor) for v in value)):
                raise MemoError(f"memo.trace: decoder layer argument {name!r} is a tensor memo cannot slice by "
                                f"token for recomputation; packed sequences and custom arguments are not supported "
                                f"yet, call the model without {name!r}")
        self.hidden_states = hidden_states
        self.args = args
        self.kwargs = kwargs
        self.batch, self.seq = hidden_states.shape[0], hidden_states.shape[1]

    def shared_tensors(self) -> list[torch.Tensor]:
        out = []
        for value in self.kwargs.values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, (tuple, list)):
                out.extend(v for v in value if isinstance(v, torch.Tensor))
        return out

    def sliced_kwargs(self, stop: int) -> dict:
        """Keyword arguments for the prefix ``[0, stop)`` of the sequence."""
        out = {}
        for name, value in self.kwargs.items():
            if name == "position_embeddings" and value is not None:
                out[name] = tuple(v[:, :stop] for v in value)
            elif name == "position_ids" and value is not None:
                out[name] = value[..., :stop]
            elif name == "attention_mask" and value is not None:
                out[name] = value[..., :stop, :stop]
            elif name in ("past_key_values", "cache"):
                out[name] = None
            else:
                out[name] = value
        return out


class AttentionKernelMode(TorchDispatchMode):
    """Sees the attention kernel of a layer call.

    In ``record`` mode it runs the kernel and remembers its outputs, so that saved tensors sharing
    their storage are ATTN_OUT. In ``replay`` mode (recomputation) it does not run attention: it
    returns ``replay(call_index, outputs_shape_hint)``, the swapped outputs sliced to the
    recomputed tokens. See NOTE [ Saved tensor classes ] rule 4.
    """

    def __init__(self, replay: Optional[Callable[[int, Any, tuple], tuple]] = None) -> None:
        super().__init__()
        self.replay = replay
        self.output_positions: dict[int, int] = {}   # storage key -> position among its kernel's outputs
        self.outputs: list[tuple] = []
        self.random_ops: set[str] = set()   # seeded random ops outside attention (dropout)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and func not in ATTENTION_KERNELS:
            self.random_ops.add(str(func))
        if func in ATTENTION_KERNELS:
            if self.replay is not None:
                out = self.replay(len(self.outputs), func, args)
            else:
                out = func(*args, **kwargs)
            self.outputs.append(out)
            for position, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    self.output_positions.setdefault(storage_key(t), position)
            return out
        return func(*args, **kwargs)


class Classifier:
    """Classifies a saved tensor of one layer call, for the runtime and the planner alike.

    ``kernel_mode`` must be active around the layer call, so that the attention kernel's outputs are
    known when autograd saves them. See NOTE [ Saved tensor classes ].
    """

    def __init__(self, layer: torch.nn.Module, call: LayerCall, kernel_mode: AttentionKernelMode,
                 convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        tensors = list(layer.parameters()) + list(layer.buffers())
        self.param_keys = {storage_key(convert(p)) for p in tensors}
        self.shared_keys = {storage_key(t) for t in call.shared_tensors()}
        self.input_key = storage_key(call.hidden_states)
        self.kernel_mode = kernel_mode

    def __call__(self, t: torch.Tensor) -> SavedClass:
        key = storage_key(t)
        if key in self.param_keys or isinstance(t, torch.nn.Parameter):
            return SavedClass.PARAM
        if key == self.input_key:
            return SavedClass.INPUT
        if key in self.shared_keys:
            return SavedClass.SHARED
        if key in self.kernel_mode.output_positions:
            return SavedClass.ATTN_OUT
        return SavedClass.OTHER

    def kind(self, t: torch.Tensor) -> str:
        """The planner's label of ``t``: NOTE [ Saved tensor classes ] rule 6."""
        cls = self(t)
        if cls is SavedClass.ATTN_OUT:
            return attention_output_kind(self.kernel_mode.output_positions[storage_key(t)])
        return PLANNER_KINDS[cls]


def _run_recording(layer_forward: Callable, layer: torch.nn.Module, call: LayerCall,
                   hidden: torch.Tensor, kwargs: dict, convert: Callable) -> tuple[list, AttentionKernelMode]:
    """Run the layer, returning (class, shape, dtype, stride, offset, storage) of every saved tensor."""
    kernel_mode = AttentionKernelMode()
    sub_call = LayerCall(hidden, call.args, kwargs)
    classify = Classifier(layer, sub_call, kernel_mode, convert)
    saved: list = []

    def pack(t):
        saved.append((classify(t), tuple(t.shape), t.dtype, tuple(t.stride()), t.storage_offset(), storage_key(t)))
        return t.detach()   # NOTE [ Pack returns a detached tensor ]

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernel_mode:
        layer_forward(hidden, *call.args, **kwargs)
    return saved, kernel_mode


def _summary(classes: list[str]) -> str:
    return ", ".join(f"{classes.count(c)} {c}" for c in dict.fromkeys(classes))


def _layouts(full: list, short: list, batch: int, seq: int, short_seq: int) -> list[TokenLayout]:
    layouts = []
    for (cls, shape, *_), (_, sshape, *_) in zip(full, short):
        changed = [d for d, (a, b) in enumerate(zip(shape, sshape)) if a != b]
        if len(changed) != 1 or len(shape) != len(sshape):
            layouts.append(TokenLayout(None))
            continue
        d = changed[0]
        if shape[d] == seq and sshape[d] == short_seq:
            layouts.append(TokenLayout(d))
        elif batch > 1 and shape[d] == batch * seq and sshape[d] == batch * short_seq:
            layouts.append(TokenLayout(d + 1, flat_batch=True))
        else:
            layouts.append(TokenLayout(None))
    return layouts


@dataclass
class LayerTrace:
    """What one layer call saves (``saved``) and the views of its attention kernel's outputs."""

    saved: list[SavedInfo]
    kernel_views: dict[int, list[tuple]]   # saved-group index -> geometries of kernel outputs in it
    batch: int
    seq: int
    hidden_shape: tuple
    hidden_dtype: torch.dtype
    # Random ops (dropout) outside attention: a recomputed prefix would draw other random numbers,
    # so such a layer swaps every token (NOTE [ Which tokens are recomputed ] rule 4).
    random_ops: tuple = ()


def autocast_state(device_type: str) -> list[tuple]:
    """(device type, enabled, dtype, cache) of autocast for ``device_type`` and the CPU, now."""
    types = dict.fromkeys([device_type, "cpu"])
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled())
            for d in types]


def autocast_like(state: list[tuple], cache: Optional[bool] = None) -> contextlib.ExitStack:
    """Re-enter the autocast of ``state`` (recomputation runs in backward, where autocast is off).

    ``cache=False`` for fake-tensor traces: autocast caches the casts of parameters, and a cast made
    under FakeTensorMode must not be handed to the real forward.
    """
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype, cache_enabled in state:
        stack.enter_context(torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype,
                                           cache_enabled=cache_enabled if cache is None else cache))
    return stack


def _partial_shape(p: torch.Tensor) -> Optional[tuple]:
    """The whole shape of a parameter this rank holds only part of (DeepSpeed ZeRO-3 outside the layer's
    forward: ``ds_shape``; FSDP2: a DTensor), else None."""
    ds_shape = getattr(p, "ds_shape", None)
    if ds_shape is not None and tuple(p.shape) != tuple(ds_shape):
        return tuple(ds_shape)
    if type(p).__name__ == "DTensor":
        return tuple(p.shape)
    return None


def _fsdp_param_dtypes(layer: torch.nn.Module) -> dict[int, torch.dtype]:
    """FSDP2's compute dtype of each sharded parameter of ``layer`` that its MixedPrecisionPolicy casts
    (``param_dtype``), by the parameter's id; FSDP2 keeps the shard in the original dtype."""
    out = {}
    for m in layer.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if callable(get_state) else None
        policy_dtype = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            # FSDPParam.param_dtype is set at FSDP's lazy init (the first forward); the policy's before it.
            dtype = getattr(fsdp_param, "param_dtype", None) or policy_dtype
            if dtype is not None and fsdp_param.sharded_param.is_floating_point():
                out[id(fsdp_param.sharded_param)] = dtype
    return out


@contextlib.contextmanager
def _whole_parameters(layer: torch.nn.Module):
    """NOTE [ Tracing a layer whose weights are sharded ]

    memo traces every swapped layer when it sizes the host pool, at the first layer's forward; a
    layer whose input requires grad differently (the first, after a frozen embedding) is traced
    apart, so under ZeRO-3 or FSDP2 some traced layers hold only their shard of each weight (their
    weights are gathered only inside their own forward). The trace needs the whole shapes only, so
    such parameters are replaced, for the trace, by fake whole tensors (the dtype the layer computes
    in: FSDP2's ``param_dtype`` under a MixedPrecisionPolicy, else the parameter's; same device and
    requires_grad); nothing is gathered and no memory is used. Must run under the trace's
    FakeTensorMode; the original parameters are put back on exit.
    """
    swapped, compute_dtypes = [], _fsdp_param_dtypes(layer)
    try:
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                shape = None if p is None else _partial_shape(p)
                if shape is not None:
                    device = p.to_local().device if type(p).__name__ == "DTensor" else p.device
                    whole = torch.empty(shape, dtype=compute_dtypes.get(id(p), p.dtype), device=device)
                    module._parameters[name] = torch.nn.Parameter(whole, requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def trace_layer(layer_forward: Callable, layer: torch.nn.Module, call: LayerCall) -> LayerTrace:
    """Saved tensors of ``layer_forward(call)`` with their class and token layout, using no memory.

    Runs the layer under ``FakeTensorMode`` on the full call and on a prefix one token shorter;
    the dimensions that shrank are the token dimensions. Raises MemoError if the layer saves a
    different sequence of tensors for the prefix (its saved tensors are then not token-wise).
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if call.seq < 2:
        raise MemoError(f"memo.trace: sequence length {call.seq} is too short to swap token-wise; use >= 2 tokens")
    short_seq = call.seq - 1
    with autocast_like(autocast_state(call.hidden_states.device.type), cache=False), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode, _whole_parameters(layer):
        # Fake copies of the parameters stay alive for the whole trace, so the converter's memo
        # hands the same fake tensor to every op and storage keys are not reused.
        fakes = {id(t): t if isinstance(t, FakeTensor) else mode.from_tensor(t)
                 for t in list(layer.parameters()) + list(layer.buffers())}

        def fake(t: torch.Tensor) -> torch.Tensor:
            return fakes[id(t)] if id(t) in fakes else mode.from_tensor(t)

        hidden = fake(call.hidden_states.detach()).requires_grad_(call.hidden_states.requires_grad)
        full_kwargs = {k: (None if k in ("past_key_values", "cache") else v) for k, v in call.kwargs.items()}
        full_kwargs = {k: (fake(v) if isinstance(v, torch.Tensor) else
                           tuple(fake(x) for x in v) if isinstance(v, tuple) else v) for k, v in full_kwargs.items()}
        fake_call = LayerCall(hidden, call.args, full_kwargs)
        full, kernel_full = _run_recording(layer_forward, layer, fake_call, hidden, full_kwargs, fake)
        kernel_geoms: dict[int, list[tuple]] = {}
        for out in kernel_full.outputs:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    kernel_geoms.setdefault(storage_key(t), []).append(
                        (tuple(t.shape), tuple(t.stride()), t.storage_offset()))
        # Contiguous like the real input, so ops that call .contiguous() save the same tensors.
        short_hidden = hidden.detach()[:, :short_seq].contiguous().requires_grad_(hidden.requires_grad)
        short, _ = _run_recording(layer_forward, layer, fake_call, short_hidden, fake_call.sliced_kwargs(short_seq),
                                  fake)
    full_classes, short_classes = [e[0].value for e in full], [e[0].value for e in short]
    if full_classes != short_classes:
        raise MemoError(f"memo.trace: {type(layer).__name__} saves different tensors for {call.seq} tokens "
                        f"({len(full)}: {_summary(full_classes)}) than for {short_seq} ({len(short)}: "
                        f"{_summary(short_classes)}); its saved tensors are not token-wise, so memo cannot swap it. "
                        f"Keep such layers on the device with keep_last_layers")
    if not kernel_full.outputs:
        raise MemoError("memo.trace: no attention kernel ran inside the decoder layer, so memo would have to "
                        "recompute attention; load the model with attn_implementation='sdpa'")
    layouts = _layouts(full, short, call.batch, call.seq, short_seq)
    first_of: dict[int, int] = {}
    infos = []
    for i, ((cls, shape, dtype, stride, offset, key), layout) in enumerate(zip(full, layouts)):
        group = first_of.setdefault(key, i)
        infos.append(SavedInfo(i, cls, shape, stride, offset, dtype, layout, group))
    kernel_views: dict[int, list[tuple]] = {}
    for key, geoms in kernel_geoms.items():
        if key in first_of:
            kernel_views[first_of[key]] = geoms
    return LayerTrace(infos, kernel_views, call.batch, call.seq, tuple(call.hidden_states.shape),
                      call.hidden_states.dtype, tuple(sorted(kernel_full.random_ops)))
