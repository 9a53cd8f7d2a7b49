"""Profile one real Hugging Face decoder layer under FakeTensorMode: no memory, real shapes.

``profile_model(model, seq_len=..., sp=...)`` builds one decoder layer (and the embedding and
the LM head + loss) from a config, runs its forward and backward on fake tensors of the
per-rank shape, and records:

* every allocation in order: id, bytes (storage size), the op step it was made at and the op
  step after which it was freed -- forward and backward separately, ready for the planner;
* every tensor autograd saves for backward, with its class: ``layer_input``,
  ``attention_output``, ``lse``, ``param``, ``shared`` (RoPE cos/sin: kept once), ``other``,
  decided by the runtime's own classifier (NOTE [ Saved tensor classes ] rule 6 in memo/trace.py).

NOTE [ Profiler allocation steps ]
  1. Each aten op (``prim`` ops excluded) is one step; op k's outputs are allocated at step k.
  2. A storage is new when an op returns a tensor whose storage was neither live nor one of the
     layer's parameters/arguments; views and in-place results reuse their input's storage.
  3. A storage freed (its last reference dropped, seen by a weakref finaliser on the storage)
     after op k began has ``end = k + 1``: it was live while op k ran.
  4. The backward trace starts with the saved activations (and nothing else from the forward)
     already live at step 0; parameter gradients are model states, kept out of the trace.
  5. With sequence parallelism (sp > 1), ring attention's in-flight key/value blocks (and, in
     backward, their gradients) are added as ``ring_buffer`` allocations at the attention step:
     two blocks each, double-buffered, as a ring implementation keeps them.
  6. The layer is profiled as the runtime runs it: with ``tile_tokens`` (None, "auto" or an int,
     as ``MemoConfig.tile_tokens``) the MLP is tiled by ``memo.tiling.install`` on the fake layer
     (NOTE [ Token tiling ] in memo/tiling.py), so the forward and backward traces hold one tile's
     MLP intermediates at a time and the saved set holds the MLP's input only. The bytes the
     untiled MLP would have saved besides its input (``mlp_saved_bytes``) are recorded too: the
     step-time model's element-wise work and the tiled backward's extra MLP forward scale with them.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memo.errors import MemoError
from memo.planner.layout import Alloc
from memo.planner.presets import ModelBoundsError, UnknownPreset, check_model_bounds, get_preset, identity_of
from memo.trace import ATTENTION_KERNELS, AttentionKernelMode, Classifier, LayerCall, attention_output_kind
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_CANONICAL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_CONFIG_BYTES = 16 << 20   # a config.json is a few KB (large label maps: ~1 MB); read no more than this


# --- model identity ------------------------------------------------------------------------------

# transformers config attribute names for each identity field, in order of preference.
_CONFIG_KEYS = {
    "layers": ("num_hidden_layers", "n_layer"),
    "hidden": ("hidden_size", "n_embd"),
    "intermediate": ("intermediate_size", "n_inner"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "vocab": ("vocab_size",),
    "head_dim": ("head_dim",),
}


def _identity_from_mapping(get, model_type: str, where: str) -> dict:
    ident: dict = {"model_type": model_type}
    missing = []
    for key, names in _CONFIG_KEYS.items():
        value = next((get(n) for n in names if get(n) is not None), None)
        ident[key] = value
    if ident["intermediate"] is None and model_type == "gpt2" and ident["hidden"] is not None:
        ident["intermediate"] = 4 * ident["hidden"]          # GPT-2's n_inner=None means 4x hidden
    if ident["kv_heads"] is None:
        ident["kv_heads"] = ident["heads"]                   # no GQA field: multi-head attention
    if ident["head_dim"] is None and ident["hidden"] and ident["heads"]:
        ident["head_dim"] = ident["hidden"] // ident["heads"]
    for key in ("layers", "hidden", "intermediate", "heads", "vocab"):
        if not isinstance(ident[key], int) or ident[key] <= 0:
            missing.append(f"{_CONFIG_KEYS[key][0]}")
    if missing:
        raise MemoError(f"memo.profile: {where} lacks {', '.join(missing)} (positive integers); add them to the "
                        f"config, or use a preset")
    return identity_of(ident)


def model_identity(hf_config) -> dict:
    """The shape-defining numbers of a transformers config, as a plan records them:
    ``{model_type, layers, hidden, intermediate, heads, kv_heads, head_dim, vocab}``."""
    model_type = getattr(hf_config, "model_type", None) or "unknown"
    return _identity_from_mapping(lambda n: getattr(hf_config, n, None), model_type,
                                  f"the {type(hf_config).__name__}")


def load_model(spec: str) -> dict:
    """A preset name or the path of a ``config.json`` (or its directory) -> model dict: the
    identity plus ``name`` and extras (rope_theta, ...). Raises MemoError naming the fix."""
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not (path.endswith(".json") or os.path.sep in spec or os.path.exists(path)):
        try:
            return get_preset(spec)
        except UnknownPreset as e:
            raise MemoError(f"memo.plan: {e}") from e
    from memo.planner.planfile import read_json
    raw = read_json(path, limit=MAX_CONFIG_BYTES, what="model config", error=MemoError,
                    fix="pass a preset name or the path of a Hugging Face config.json (a few KB)")
    if not isinstance(raw, dict):
        raise MemoError(f"memo.plan: {path!r} holds a {type(raw).__name__}, not a config object; pass a Hugging "
                        f"Face config.json")
    model_type = raw.get("model_type")
    if not model_type:
        raise MemoError(f"memo.plan: {path!r} lacks model_type; add e.g. \"model_type\": \"llama\"")
    model = _identity_from_mapping(raw.get, model_type, repr(path))
    try:
        check_model_bounds(model, f"memo.plan: model config {path!r}")
    except ModelBoundsError as e:
        raise MemoError(str(e)) from e
    model["name"] = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    for extra in ("rope_theta", "sliding_window", "rms_norm_eps", "tie_word_embeddings"):
        if raw.get(extra) is not None:
            model[extra] = raw[extra]
    return model


def hf_config_from_model(model: dict):
    """A transformers config with the model's numbers, sdpa attention, no dropout."""
    from transformers import AutoConfig
    mt = model["model_type"]
    if mt == "gpt2":
        kwargs = dict(n_layer=model["layers"], n_embd=model["hidden"], n_inner=model["intermediate"],
                      n_head=model["heads"], vocab_size=model["vocab"], n_positions=2048,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                      # Megatron (the paper) fuses bias + GeLU and saves only its input; HF's default
                      # "gelu_new" is unfused and saves four 4h-wide temporaries.
                      activation_function="gelu_pytorch_tanh")
    else:
        kwargs = dict(num_hidden_layers=model["layers"], hidden_size=model["hidden"],
                      intermediate_size=model["intermediate"], num_attention_heads=model["heads"],
                      num_key_value_heads=model["kv_heads"], head_dim=model["head_dim"], vocab_size=model["vocab"],
                      attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        for extra in ("rope_theta", "sliding_window", "rms_norm_eps"):
            if extra in model:
                kwargs[extra] = model[extra]
    try:
        cfg = AutoConfig.for_model(mt, **kwargs)
    except ValueError as e:
        raise MemoError(f"memo.profile: transformers does not know model_type {mt!r} ({e}); use a Llama-style "
                        f"model or a preset") from e
    cfg._attn_implementation = "sdpa"
    return cfg


def _layer_classes(cfg):
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    mt = cfg.model_type
    name = model_type_to_module_name(mt)
    try:
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError as e:
        raise MemoError(f"memo.profile: no modeling code for model_type {mt!r} in transformers; use a Llama-style "
                        f"model or a preset") from e
    layer = getattr(mod, "GPT2Block", None) if mt == "gpt2" else next(
        (getattr(mod, n) for n in dir(mod) if n.endswith("DecoderLayer") and not n.startswith("_")), None)
    rope = next((getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding")), None)
    norm = next((getattr(mod, n) for n in dir(mod) if n.endswith("RMSNorm")), None)
    if layer is None:
        raise MemoError(f"memo.profile: cannot find the decoder layer class of model_type {mt!r}; memo profiles "
                        f"Llama-style and GPT-2 layers")
    return layer, rope, norm


# --- the recorder --------------------------------------------------------------------------------

@dataclass
class _Rec:
    id: str
    bytes: int
    start: int
    kind: str
    op: str
    end: Optional[int] = None


@dataclass
class Trace:
    """Allocations of one block (a layer's forward, its backward, ...), in allocation order."""

    allocs: list[_Rec] = field(default_factory=list)
    steps: int = 0

    def to_allocs(self, exclude=("param_grad",)) -> list[Alloc]:
        return [Alloc(r.id, r.bytes, r.start, r.end, r.kind) for r in self.allocs if r.kind not in exclude]


class AllocationRecorder(TorchDispatchMode):
    """Records the storages ops create and when they die. See NOTE [ Profiler allocation steps ]."""

    def __init__(self, static_keys: set[int], sp: int = 1):
        super().__init__()
        self.static = set(static_keys)      # params, buffers, shared arguments: not allocations
        self.live: dict[int, _Rec] = {}
        self.trace = Trace()
        self.phase = "f"
        self.step = -1
        self.sp = sp
        self._n = 0

    def _on_free(self, key: int) -> None:
        rec = self.live.pop(key, None)
        if rec is not None and rec.end is None:
            rec.end = self.step + 1

    def add(self, key: int, nbytes: int, kind: str, op: str, storage=None, start: Optional[int] = None) -> _Rec:
        rec = _Rec(f"{self.phase}{self._n}", int(nbytes), self.step if start is None else start, kind, op)
        self._n += 1
        self.trace.allocs.append(rec)
        if key is not None:
            self.live[key] = rec
            if storage is not None:
                weakref.finalize(storage, self._on_free, key)
        return rec

    def add_transient(self, nbytes: int, kind: str, op: str) -> None:
        rec = self.add(None, nbytes, kind, op)
        rec.end = self.step + 1

    def begin(self, phase: str, carried: dict[int, str]) -> None:
        """Start a new block; ``carried`` storages (key -> kind) are live at its step 0."""
        self.close()
        old = self.live
        self.trace, self.phase, self.step, self._n, self.live = Trace(), phase, 0, 0, {}
        for key, kind in carried.items():
            prev = old.get(key)
            if prev is not None:
                self.add(key, prev.bytes, kind, "carried", start=0)
        self.step = -1

    def close(self) -> Trace:
        end = max(self.step + 1, 1)
        for rec in self.trace.allocs:
            if rec.end is None:
                rec.end = end
            rec.end = max(rec.end, rec.start + 1)
        self.trace.steps = end
        return self.trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("prim."):
            return func(*args, **kwargs)
        self.step += 1
        out = func(*args, **kwargs)
        kernel = func in ATTENTION_KERNELS
        for position, item in enumerate(out if isinstance(out, tuple) else (out,)):
            for t in tree_flatten(item)[0]:
                if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                    continue
                st = t.untyped_storage()
                key = st._cdata
                if key in self.live or key in self.static:
                    continue
                # Labelled as the saved-tensor classifier labels them: NOTE [ Saved tensor classes ] rule 6.
                kind = attention_output_kind(position) if kernel else "other"
                self.add(key, st.nbytes(), kind, name.replace("aten.", "").replace(".default", ""), storage=st)
        if kernel and self.sp > 1:
            # NOTE [ Profiler allocation steps ] rule 5: k and v blocks in flight, double-buffered.
            q, k, v = args[0], args[1], args[2]
            kv = k.numel() * k.element_size() + v.numel() * v.element_size()
            self.add_transient(2 * kv, "ring_buffer", "ring_kv")
        if "attention" in name and name.endswith("_backward.default") and self.sp > 1:
            # (the CPU kernel is ..._flash_attention_for_cpu_backward). dk/dv travel in fp32
            # (NOTE [ Ring step order ] rule 4 in memo/attention/ring.py).
            k, v = args[2], args[3]
            kv = k.numel() * k.element_size() + v.numel() * v.element_size()
            self.add_transient(2 * kv, "ring_buffer", "ring_kv")
            self.add_transient(2 * (k.numel() + v.numel()) * 4, "ring_buffer", "ring_dkv")
        return out


# --- profiling -----------------------------------------------------------------------------------

@dataclass
class LayerProfile:
    """What one rank's decoder layer (and embedding, head) allocates and saves. Sizes in bytes."""

    model: dict
    seq_len: int
    local_seq_len: int
    micro_batch: int
    dtype: str
    sp: int
    forward: Trace
    backward: Trace
    saved: list[dict]                 # autograd's saved tensors in order: kind, bytes, shape, dtype
    saved_bytes: dict[str, int]       # unique storages per class (layer_input always counted)
    embedding_forward: Trace
    embedding_backward: Trace
    head: Trace
    loss_chunk: Optional[int]
    profile_s: float
    swap_ratio: Optional[float] = None
    tile_tokens: Optional[int] = None     # the MLP's tile (tokens) in the profile; None: untiled
    tile_setting: object = None           # what was asked: None, "auto" or an int
    mlp_saved_bytes: int = 0              # what the untiled MLP saves besides its input (rule 6)
    mlp_output_unused: bool = False       # memo's recompute skips the tiled MLP (NOTE [ Token tiling ] rule 7)

    @property
    def swapped_bytes(self) -> Optional[int]:
        """Bytes one layer swaps at ``swap_ratio``: input, attention output, LSE, and that share of the rest."""
        if self.swap_ratio is None:
            return None
        sb = self.saved_bytes
        return int(sb["layer_input"] + sb["attention_output"] + sb["lse"] + self.swap_ratio * sb["other"])

    @property
    def recomputed_bytes(self) -> Optional[int]:
        return None if self.swap_ratio is None else int((1.0 - self.swap_ratio) * self.saved_bytes["other"])

    def to_dict(self) -> dict:
        def tr(t: Trace):
            return {"steps": t.steps, "allocs": [{"id": r.id, "bytes": r.bytes, "start": r.start, "end": r.end,
                                                  "kind": r.kind, "op": r.op} for r in t.allocs]}
        return {"model": self.model, "seq_len": self.seq_len, "local_seq_len": self.local_seq_len,
                "micro_batch": self.micro_batch, "dtype": self.dtype, "sp": self.sp, "saved": self.saved,
                "saved_bytes": self.saved_bytes, "forward": tr(self.forward), "backward": tr(self.backward),
                "embedding_forward": tr(self.embedding_forward), "embedding_backward": tr(self.embedding_backward),
                "head": tr(self.head), "loss_chunk": self.loss_chunk, "profile_s": self.profile_s,
                "swap_ratio": self.swap_ratio, "swapped_bytes": self.swapped_bytes,
                "recomputed_bytes": self.recomputed_bytes, "tile_tokens": self.tile_tokens,
                "tile_setting": self.tile_setting, "mlp_saved_bytes": self.mlp_saved_bytes,
                "mlp_output_unused": self.mlp_output_unused}


def check_seq_len(seq_len: int, sp: int) -> int:
    """Tokens per rank; raises MemoError when the zigzag layout cannot split ``seq_len``."""
    if seq_len <= 0:
        raise MemoError(f"memo.plan: sequence length {seq_len} must be positive")
    if sp < 1:
        raise MemoError(f"memo.plan: sequence-parallel degree {sp} must be >= 1")
    if sp > 1 and seq_len % (2 * sp):
        lo = seq_len // (2 * sp) * (2 * sp)
        raise MemoError(f"memo.plan: sequence length {seq_len} cannot be split by the zigzag layout over {sp} ranks "
                        f"(it needs a multiple of 2 x sp = {2 * sp}); use {lo} or {lo + 2 * sp}")
    return seq_len // sp


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _run_layer(layer, x, shared):
    if shared is None:
        out = layer(x)
    else:
        out = layer(x, attention_mask=None, position_embeddings=shared)
    return out[0] if isinstance(out, tuple) else out


def profile_layer_saved(layer, x: torch.Tensor, shared=None, tiled=None,
                        mlp_marks: Optional[list] = None) -> tuple[list[dict], torch.Tensor]:
    """Run ``layer`` on ``x: (batch, tokens, hidden)`` (real or fake tensors); return what
    autograd saves, in order (shape, dtype, storage bytes, storage key, the runtime's class and the
    planner's label: NOTE [ Saved tensor classes ] in memo/trace.py), and the layer output.
    With ``tiled`` (the layer's ``memo.tiling.TiledLayer``) the index of the tiled MLP's saved input
    is appended to ``mlp_marks``. Used by the profiler and by tests that compare it with a real run
    and with the runtime."""
    kernel_mode = AttentionKernelMode()
    kwargs = {} if shared is None else {"attention_mask": None, "position_embeddings": shared}
    classify = Classifier(layer, LayerCall(x, (), kwargs), kernel_mode)
    saved = []

    def pack(t):
        if tiled is not None and tiled.saving:
            mlp_marks.append(len(saved))
        saved.append({"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                      "bytes": t.untyped_storage().nbytes(), "key": _storage_key(t),
                      "class": classify(t).value, "kind": classify.kind(t)})
        return t.detach()   # NOTE [ Pack returns a detached tensor ] in memo/trace.py

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernel_mode:
        out = _run_layer(layer, x, shared)
    kernel_mode.outputs.clear()   # the kernel's outputs must die when backward frees them, as in a plain run
    return saved, out


def _mlp_saved_bytes(layer, x: torch.Tensor, with_norm: bool = True) -> int:
    """Bytes the layer's untiled MLP, and the norm tiled with it (NOTE [ Token tiling ] rule 8 in
    memo/tiling.py), save for backward besides their input (and parameters), on an input shaped like
    ``x``: what tiling takes out of the saved set (NOTE [ Profiler allocation steps ] rule 6). 0 for a
    layer without a per-token MLP; ``with_norm`` False: the MLP only (one tile covers ``x``). Call before
    ``tiling.install``."""
    from memo.tiling import mlp_of, norm_before_mlp
    mlp = mlp_of(layer)
    if mlp is None:
        return 0
    norm = norm_before_mlp(layer) if with_norm else None
    modules = [m for m in (norm, mlp) if m is not None]
    h = torch.empty_like(x).requires_grad_(True)
    skip = {_storage_key(h)} | {_storage_key(p) for m in modules for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(norm(h) if norm is not None else h)
    return sum(seen.values())


def profile_model(model: dict, *, seq_len: int, micro_batch: int = 1, dtype: str = "bf16", sp: int = 1,
                  loss_chunk: Optional[int] = 4096, swap_ratio: Optional[float] = None,
                  tile_tokens="auto") -> LayerProfile:
    """Profile one decoder layer of ``model`` (a dict from ``load_model``) at ``seq_len / sp``
    tokens per rank, plus the embedding and the LM head + loss (one chunk of ``loss_chunk``
    tokens at a time; None for the whole sequence at once). With ``swap_ratio`` the profile
    also reports the bytes one layer swaps (input, attention output and LSE in full, that share
    of the rest) and recomputes; the planner otherwise chooses it (see planner/alpha.py).
    ``tile_tokens`` (None, "auto" or an int: ``MemoConfig.tile_tokens``) tiles the MLP as the
    runtime does (NOTE [ Profiler allocation steps ] rule 6)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memo import tiling

    if dtype not in DTYPES:
        raise MemoError(f"memo.plan: dtype {dtype!r} is not one of bf16, fp16, fp32; pass one of those")
    tdtype = DTYPES[dtype]
    local = check_seq_len(seq_len, sp)
    if micro_batch < 1:
        raise MemoError(f"memo.plan: micro batch {micro_batch} must be >= 1")
    if swap_ratio is not None and not 0.0 <= swap_ratio <= 1.0:
        raise MemoError(f"memo.plan: swap ratio {swap_ratio} is outside [0, 1]; pass a fraction of tokens to swap")
    tile_setting = tiling.check_tile_setting(tile_tokens)
    tile = tiling.resolve_tile(tile_setting, batch=micro_batch, seq=local, hidden=model["hidden"],
                               intermediate=model["intermediate"], itemsize=tdtype.itemsize)
    cfg = hf_config_from_model(model)
    layer_cls, rope_cls, norm_cls = _layer_classes(cfg)
    t0 = time.perf_counter()
    old_dtype = torch.get_default_dtype()
    try:
        with FakeTensorMode():
            torch.set_default_dtype(tdtype)      # before building: .to(dtype) fails under FakeTensorMode
            try:
                layer = layer_cls(cfg, layer_idx=0)
                h = model["hidden"]
                x = torch.empty(micro_batch, local, h, requires_grad=True)
                mlp_saved = _mlp_saved_bytes(layer, x, with_norm=tile < local) if tile is not None else 0
                tiled = tiling.install([layer], tile, model["intermediate"]) if tile is not None else {}
                shared = None
                if model["model_type"] != "gpt2":
                    rope = rope_cls(cfg)
                    pos = torch.arange(local).unsqueeze(0)
                    shared = tuple(t.detach() for t in rope(x, pos))
                params = {_storage_key(p) for p in layer.parameters()} | {_storage_key(b) for b in layer.buffers()}
                shared_keys = {_storage_key(t) for t in shared} if shared else set()
                x_key = _storage_key(x)
                rec = AllocationRecorder(params | shared_keys, sp=sp)
                rec.add(x_key, x.untyped_storage().nbytes(), "layer_input", "argument", start=0)
                rec.step = -1
                marks: list[int] = []
                with rec:
                    saved, out = profile_layer_saved(layer, x, shared, tiled.get(0), marks)
                # NOTE [ Token tiling ] rule 7: memo's recompute skips the MLP when nothing saved after
                # its input depends on its output (the executor's own test, on the profiled trace).
                mlp_output_unused = bool(marks) and all(e["class"] in ("param", "shared")
                                                        for e in saved[marks[-1] + 1:])
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                # A layer memo cannot trace: data-dependent shapes (MoE routing), attention options
                # sdpa lacks (soft-capping), or a call signature unlike Llama's.
                first_line = (str(e).splitlines() or [""])[0][:200]
                raise MemoError(f"memo.profile: cannot run a {model['model_type']} decoder layer under "
                                f"FakeTensorMode ({type(e).__name__}: {first_line}); memo profiles "
                                f"dense Llama-style and GPT-2 layers with sdpa attention: use one of those or a "
                                f"preset") from e
            fwd = rec.trace
            saved_bytes = {"layer_input": x.untyped_storage().nbytes(), "attention_output": 0, "lse": 0,
                           "other": 0, "param": 0, "shared": 0}
            seen = {x_key}
            carried: dict[int, str] = {}
            for s in saved:
                key = s.pop("key")
                del s["class"]    # the plan records the planner's label ("kind") only
                if key not in seen:
                    seen.add(key)
                    saved_bytes[s["kind"]] += s["bytes"]
                if s["kind"] not in ("param", "shared"):
                    carried[key] = s["kind"]
            # NOTE [ Profiler allocation steps ] rule 4: the backward starts from the saved activations.
            rec.begin("b", carried)
            with rec:
                grad_out = torch.ones_like(out)
                out.backward(grad_out)
            bwd = rec.close()
            saved_info = list(saved)
            grads = {_storage_key(p.grad) for p in layer.parameters() if p.grad is not None}
            for r in bwd.allocs:
                if r.op != "carried" and any(rec.live.get(k) is r for k in grads):
                    r.kind = "param_grad"
                elif x.grad is not None and rec.live.get(_storage_key(x.grad)) is r:
                    r.kind = "grad_input"
            del out, grad_out, saved

            emb_f, emb_b = _profile_embedding(model, micro_batch, local)
            head = _profile_head(model, cfg, norm_cls, micro_batch, local, loss_chunk)
    finally:
        torch.set_default_dtype(old_dtype)
    return LayerProfile(model=identity_of(model), seq_len=seq_len, local_seq_len=local, micro_batch=micro_batch,
                        dtype=_CANONICAL_DTYPE[tdtype], sp=sp, forward=fwd, backward=bwd, saved=saved_info,
                        saved_bytes=saved_bytes, embedding_forward=emb_f, embedding_backward=emb_b, head=head,
                        loss_chunk=loss_chunk, profile_s=time.perf_counter() - t0, swap_ratio=swap_ratio,
                        tile_tokens=tile if tiled else None, tile_setting=tile_setting,
                        mlp_saved_bytes=mlp_saved if tiled else 0, mlp_output_unused=mlp_output_unused)


def _profile_embedding(model: dict, micro_batch: int, local: int) -> tuple[Trace, Trace]:
    """Token embedding of the local tokens: forward output, and the backward's temporaries (the
    dense weight gradient is a model state and is marked ``param_grad``)."""
    emb = torch.nn.Embedding(model["vocab"], model["hidden"])
    ids = torch.zeros(micro_batch, local, dtype=torch.long)
    rec = AllocationRecorder({_storage_key(emb.weight), _storage_key(ids)})
    with rec:
        out = emb(ids)
    fwd = rec.trace
    rec.begin("b", {})
    with rec:
        out.backward(torch.ones_like(out))
    bwd = rec.close()
    gkey = _storage_key(emb.weight.grad)
    for r in bwd.allocs:
        if rec.live.get(gkey) is r:
            r.kind = "param_grad"
    return fwd, bwd


def _profile_head(model: dict, cfg, norm_cls, micro_batch: int, local: int, chunk: Optional[int]) -> Trace:
    """Final norm, LM head and cross-entropy, forward and backward as one block. With a chunk
    size it runs memo's own chunked loss with the final norm fused into it (NOTE [ Chunked loss
    with the final norm ] in memo/loss.py): the norm, the logits and their gradients exist for
    ``chunk`` tokens at a time. Without, the model's own: the norm over the whole sequence, the
    logits of the whole sequence."""
    h, v = model["hidden"], model["vocab"]
    if model["model_type"] == "gpt2" or norm_cls is None:
        norm = torch.nn.LayerNorm(h)
    else:
        norm = norm_cls(h, eps=getattr(cfg, "rms_norm_eps", 1e-6))
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.empty(micro_batch, local, h, requires_grad=True)
    labels = torch.zeros(micro_batch, local, dtype=torch.long)
    static = {_storage_key(t) for t in (*norm.parameters(), head.weight, labels)}
    rec = AllocationRecorder(static)
    rec.add(_storage_key(hidden), hidden.untyped_storage().nbytes(), "layer_input", "argument", start=0)
    rec.step = -1
    with rec:
        if chunk:   # memo's own code, on the first two chunks and the last (the others allocate alike)
            from memo.loss import NormedChunkedLMLossFunction
            targets = torch.zeros(micro_batch * local, dtype=torch.long)
            opts = dict(chunk_size=min(chunk, local), ignore_index=-100, logit_scale=None, softcap=None,
                        profile_chunks=3)
            NormedChunkedLMLossFunction.apply(hidden.view(-1, h), head.weight, None, targets, norm, opts,
                                              *norm.parameters()).backward()
        else:
            normed = norm(hidden)
            logits = head(normed).float()
            loss = torch.nn.functional.cross_entropy(logits.view(-1, v), labels.reshape(-1))
            del logits
            loss.backward()
    trace = rec.close()
    gkeys = {_storage_key(p.grad) for p in (*norm.parameters(), head.weight) if p.grad is not None}
    for r in trace.allocs:
        if any(rec.live.get(k) is r for k in gkeys):
            r.kind = "param_grad"
    return trace
