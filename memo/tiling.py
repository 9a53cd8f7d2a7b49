"""Token tiling: a decoder layer's MLP run over tiles of tokens, in forward and in backward.

At long lengths a layer's largest transients are the MLP's intermediates: gate, up and the
activation's output are (batch, seq, intermediate) each, 3.5x a hidden-state tensor in Llama-3-8B,
and their gradients as many again in backward. Tiling makes them one tile's worth.

# NOTE [ Token tiling ]
#
# 1. A tiled MLP is one autograd Function (``_TiledMLP``). Its forward runs the MLP module's own
#    forward on tiles of ``tile`` tokens (dimension 1 of the (batch, seq, hidden) input) with grad
#    disabled, writes each tile's output into the (batch, seq, out) result and saves only the
#    input. The MLP's intermediates exist one tile at a time.
# 2. Its backward recomputes each tile's forward with grad enabled (under the forward's autocast),
#    backpropagates that tile's output gradient, writes the tile's input gradient into a
#    (batch, seq, hidden) buffer and sums the parameter gradients over tiles (in fp32 for
#    low-precision parameters). With one tile it returns autograd's own gradients of the same
#    ops: bit-identical to the untiled MLP.
# 3. The saved input is a token tensor like any other: memo swaps the last alpha share of its
#    tokens and recomputes the rest (NOTE [ Which tokens are recomputed ] in memo/swap/record.py);
#    in memo's token-wise recompute the tiled forward runs again on the prefix and saves the prefix
#    of the input, in the same position among the layer's saved tensors. The recompute tiles (and
#    fuses the norm, rule 8) exactly as the forward did (``TiledLayer.replaying``), whatever the
#    prefix's length: "auto" or the one-tile rule of 8 would otherwise decide differently for a
#    shorter sequence and save other tensors.
# 4. Random ops inside the MLP (dropout in training) draw the same numbers in the backward's
#    recompute: the forward stashes the CPU and device RNG states and the backward restores them
#    inside ``torch.random.fork_rng`` before running the tiles in forward order.
# 5. Parameters reach the Function as inputs (not as saved tensors): autograd accumulates their
#    gradients as for the untiled MLP, so DDP/ZeRO hooks on them fire as usual. The backward's
#    recompute reads the module's parameters again (never a copy).
# 6. The tile: an int is used as given (one tile if it covers the sequence). ``"auto"`` (``auto_tile``) picks the largest multiple of
#    256 tokens whose intermediate (batch x tile x intermediate elements) is at most one
#    hidden-state tensor of the whole sequence and at most 256 MiB, and at least 4096 tokens; a
#    sequence no longer than the tile runs untiled (no extra compute at lengths where the MLP's
#    intermediates are not what limits memory).
# 7. memo's recomputes (the token-wise one and an "input" layer's, NOTE [ Layer policies ] in
#    memo/executor.py) rerun a layer only for the tensors it saves. When nothing the layer saves
#    after its tiled MLP's input depends on the MLP's output (only parameters and shared
#    arguments are saved after it, as in Llama, where the output goes to a residual add), the
#    recompute saves the input and returns zeros of the output's shape instead of computing it:
#    the MLP's forward then runs twice per step (forward, tiled backward), as untiled at ratio 0.
# 8. The norm just before the MLP is tiled with it (``norm_before_mlp``: ``pre_feedforward_layernorm``
#    in Gemma 2/3, ``post_attention_layernorm`` where it feeds the MLP as in Llama, Mistral, Qwen,
#    Gemma, Phi-3 and Starcoder2, ``ln_2`` in GPT-2; none in Olmo 2, whose norms follow their
#    blocks). The norm then returns its input unchanged and the tiled MLP runs norm and MLP per
#    tile, so the saved tensor is the norm's input (bf16 hidden state) instead of the norm's fp32
#    upcast, its rsqrt and its output (8 bytes a hidden element in a bf16 RMSNorm, 2 after), and
#    the norm's fp32 backward transients are one tile wide. The decision is the MLP's own (same
#    input shape, grad mode and parameters), made when the norm runs; the MLP must then receive
#    exactly the tensor the norm returned, or memo raises rather than skip the norm. With one tile
#    covering the sequence the norm runs on its own, so that rule 2's bit-identity holds: fused,
#    autograd would sum the norm's two paths into its input before adding the residual's gradient,
#    a different order of the same fp additions.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Union

import torch

from memo.errors import MemoError
from memo.trace import autocast_like, autocast_state

AUTO_MIN_TILE = 4096            # tokens: GEMMs of 4096 rows still run near peak on a GPU
AUTO_MAX_TILE_BYTES = 256 << 20  # one tile's intermediate (batch x tile x intermediate)
TILE_MULTIPLE = 256


def check_tile_setting(value) -> Union[None, int, str]:
    """Validate ``MemoConfig.tile_tokens``: None, "auto" or a positive int."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemoError(f"memo.config: tile_tokens={value!r} is not accepted; use None (no tiling), 'auto' (a tile "
                        f"chosen from the model's sizes) or a positive int (tokens per tile)")
    return value


def auto_tile(*, batch: int, seq: int, hidden: int, intermediate: int, itemsize: int) -> Optional[int]:
    """The tile ``"auto"`` picks (NOTE [ Token tiling ] rule 6); None: run untiled."""
    by_hidden = seq * hidden // max(intermediate, 1)
    by_bytes = AUTO_MAX_TILE_BYTES // max(batch * intermediate * itemsize, 1)
    tile = max(min(by_hidden, by_bytes) // TILE_MULTIPLE * TILE_MULTIPLE, AUTO_MIN_TILE)
    return None if tile >= seq else tile


def resolve_tile(setting, *, batch: int, seq: int, hidden: int, intermediate: int, itemsize: int) -> Optional[int]:
    """Tokens per tile for a call of ``seq`` tokens; None: untiled."""
    if setting is None:
        return None
    if setting == "auto":
        return auto_tile(batch=batch, seq=seq, hidden=hidden, intermediate=intermediate, itemsize=itemsize)
    return int(setting)   # one tile when it covers the sequence: bit-identical to untiled (rule 2)


def rng_states(device: torch.device) -> tuple:
    """(CPU RNG state, ``device``'s RNG state or None on the CPU), to draw the same numbers again."""
    cpu = torch.get_rng_state()
    if device.type == "cpu":
        return cpu, None
    return cpu, torch.get_device_module(device.type).get_rng_state(device)


def restore_rng_states(stack, states: tuple, device: torch.device) -> None:
    """Inside ``stack`` (an ExitStack): fork the RNGs, then set ``states``; the exit restores the fork's."""
    cpu_state, device_state = states
    devices = [] if device_state is None else [device]
    stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device.type))
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.get_device_module(device.type).set_rng_state(device_state, device)


def mlp_tiles_forward(run: Callable, x: torch.Tensor, tile: int) -> torch.Tensor:
    """``run`` over tiles of ``tile`` tokens of ``x`` (batch, seq, hidden), no grad: (batch, seq, out)."""
    out = None
    seq = x.shape[1]
    for start in range(0, seq, tile):
        part = run(x.narrow(1, start, min(tile, seq - start)))
        if not isinstance(part, torch.Tensor) or part.shape[:2] != (x.shape[0], min(tile, seq - start)):
            raise MemoError(f"memo.tiling: the MLP returned {type(part).__name__} "
                            f"{tuple(getattr(part, 'shape', ()))} for a tile of shape {tuple(x.shape[:2])}; it is not "
                            f"a per-token MLP, pass MemoConfig(tile_tokens=None)")
        if out is None:
            out = part.new_empty((x.shape[0], seq) + tuple(part.shape[2:]))
        out.narrow(1, start, part.shape[1]).copy_(part)
    return out


def mlp_tiles_backward(run: Callable, x: torch.Tensor, grad_out: torch.Tensor, params: list, tile: int) -> tuple:
    """Input and parameter gradients of ``run`` over tiles (NOTE [ Token tiling ] rule 2).

    x: (batch, seq, hidden); grad_out: (batch, seq, out). Returns (grad_x, [grad per param or None]).
    """
    seq = x.shape[1]
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
    grad_x = torch.empty_like(x) if x.requires_grad else None
    single = tile >= seq
    for start in range(0, seq, tile):
        n = min(tile, seq - start)
        xt = x.narrow(1, start, n).detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            out = run(xt)
        inputs = ([xt] if x.requires_grad else []) + [params[i] for i in wanted]
        grads = torch.autograd.grad(out, inputs, grad_out.narrow(1, start, n), allow_unused=True)
        if x.requires_grad:
            if single:
                grad_x = grads[0]
            else:
                grad_x.narrow(1, start, n).copy_(grads[0])
            grads = grads[1:]
        for i, g in zip(wanted, grads):
            if g is None:
                continue
            if single:
                grad_params[i] = g
            elif grad_params[i] is None:
                grad_params[i] = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g.clone()
            else:
                grad_params[i].add_(g)
        del out, grads
    for i, p in enumerate(params):
        if grad_params[i] is not None and grad_params[i].dtype != p.dtype:
            grad_params[i] = grad_params[i].to(p.dtype)
    return grad_x, grad_params


class _TiledMLP(torch.autograd.Function):
    """Thin autograd plumbing around ``mlp_tiles_forward`` / ``mlp_tiles_backward``."""

    @staticmethod
    def forward(ctx, run, tile, out_tail, x, *params):
        ctx.run, ctx.tile, ctx.n_params = run, tile, len(params)
        ctx.params = params   # references to leaves, not saved tensors (NOTE [ Token tiling ] rule 5)
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_states(x.device)
        ctx.save_for_backward(x)
        if out_tail is not None:   # rule 7: a recompute that needs only the saved input
            return x.new_zeros(tuple(x.shape[:2]) + tuple(out_tail))
        with torch.no_grad():
            return mlp_tiles_forward(run, x, tile)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with contextlib.ExitStack() as stack:
            restore_rng_states(stack, ctx.rng, x.device)
            stack.enter_context(autocast_like(ctx.autocast))
            grad_x, grad_params = mlp_tiles_backward(ctx.run, x, grad_out.contiguous(), list(ctx.params), ctx.tile)
        return (None, None, None, grad_x, *grad_params)


def tiled_mlp(run: Callable, x: torch.Tensor, params: list, tile: int, out_tail: Optional[tuple] = None):
    """``run(x)`` (a per-token MLP) with its intermediates one tile of ``tile`` tokens at a time.

    ``out_tail``: the output's trailing shape, to return zeros of that shape instead of computing them
    (NOTE [ Token tiling ] rule 7); None computes the output.
    """
    return _TiledMLP.apply(run, tile, out_tail, x, *params)


# --- installing on decoder layers ------------------------------------------------------------

def norm_before_mlp(layer: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The norm whose output is the MLP's input and nothing else's (NOTE [ Token tiling ] rule 8), or None."""
    if hasattr(layer, "pre_feedforward_layernorm"):            # Gemma 2/3: post_attention_layernorm is the attention's
        norm = layer.pre_feedforward_layernorm
    elif hasattr(layer, "post_feedforward_layernorm"):        # Olmo 2: norms after attention and after the MLP
        return None
    elif hasattr(layer, "post_attention_layernorm"):
        norm = layer.post_attention_layernorm
    else:
        norm = getattr(layer, "ln_2", None)                   # GPT-2
    if not isinstance(norm, torch.nn.Module) or not type(norm).__name__.endswith(("RMSNorm", "LayerNorm")):
        return None
    return norm


def mlp_of(layer: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The layer's per-token MLP, or None (mixture-of-experts blocks route tokens and return more)."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, torch.nn.Module) or hasattr(mlp, "experts") or hasattr(mlp, "router"):
        return None
    return mlp


class TiledLayer:
    """Tiling state of one decoder layer's MLP (and the norm before it): the setting, the tile of the
    last call, the reason."""

    def __init__(self, mlp: torch.nn.Module, setting, intermediate: int,
                 norm: Optional[torch.nn.Module] = None) -> None:
        self.mlp = mlp
        self.norm = norm                  # tiled with the MLP (NOTE [ Token tiling ] rule 8) or None
        self.setting = setting
        self.intermediate = intermediate
        self.original = mlp.forward
        self.norm_original = norm.forward if norm is not None else None
        self.params = list(norm.parameters() if norm is not None else ()) + list(mlp.parameters())
        self.tile: Optional[int] = None   # tokens per tile in the last call; None: untiled
        self.out_tail: Optional[tuple] = None   # trailing output shape of the last computed call
        self.fused = False                # the last call tiled the norm with the MLP (rule 8)
        self.skip_output = False          # rule 7, set by memo's recompute (``replaying``)
        self.forced: Optional[tuple] = None   # (tile, fused) of the forward a recompute replays (rule 3)
        self.saving = False               # inside the Function's apply: its saved tensor is the MLP input
        self.pending: Optional[torch.Tensor] = None   # the norm's input, passed on unnormalised (rule 8)

    def decision(self) -> tuple:
        """(tile, fused) of the last call: what memo's recompute of this layer must do again."""
        return self.tile, self.fused

    @contextlib.contextmanager
    def replaying(self, decision: tuple, skip: bool):
        """Inside: calls tile (and fuse the norm) as the forward did, whatever the length of the
        recomputed prefix (rule 3), and with ``skip`` the tiled MLP saves its input but returns
        zeros (rule 7)."""
        self.forced, self.skip_output = decision, skip
        try:
            yield
        finally:
            self.forced, self.skip_output = None, False

    def _tile_for(self, x, args, kwargs) -> Optional[int]:
        """Tokens per tile for a call on ``x``, or None to run untiled."""
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        if self.forced is not None:
            return self.forced[0]
        batch, seq, hidden = x.shape
        tile = resolve_tile(self.setting, batch=batch, seq=seq, hidden=hidden, intermediate=self.intermediate,
                            itemsize=x.element_size())
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.params))
        return tile if grad else None

    def norm_forward(self, x: torch.Tensor, *args, **kwargs):
        """The norm before the MLP: its input unchanged when the MLP will tile both (rule 8)."""
        self.pending = None   # a forward that raised between the norm and the MLP left one behind
        tile = self._tile_for(x, args, kwargs)
        fuse = self.forced[1] if self.forced is not None else tile is not None and tile < x.shape[1]
        if tile is None or not fuse:
            return self.norm_original(x, *args, **kwargs)
        self.pending = x
        return x

    def _norm_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.original(self.norm_original(x))

    def forward(self, x: torch.Tensor, *args, **kwargs):
        pending, self.pending = self.pending, None
        if pending is not None and x is not pending:
            raise MemoError("memo.tiling: the MLP's input is not the output of the norm before it, which memo tiles "
                            "with the MLP (NOTE [ Token tiling ] rule 8) in this layer class; pass "
                            "MemoConfig(tile_tokens=None)")
        self.tile = self._tile_for(x, args, kwargs)
        self.fused = pending is not None
        if self.tile is None:
            return self.original(x, *args, **kwargs)
        tail = self.out_tail if self.skip_output else None
        self.saving = True
        try:
            out = tiled_mlp(self._norm_mlp if pending is not None else self.original, x,
                            self.params if pending is not None else list(self.mlp.parameters()), self.tile, tail)
        finally:
            self.saving = False
        if tail is None:
            self.out_tail = tuple(out.shape[2:])
        return out


def install(layers: list[torch.nn.Module], setting, intermediate: int) -> dict[int, TiledLayer]:
    """Tile the MLP (and the norm before it) of every layer that has a per-token one; returns
    {layer index: TiledLayer}."""
    setting = check_tile_setting(setting)
    out = {}
    if setting is None:
        return out
    for i, layer in enumerate(layers):
        mlp = mlp_of(layer)
        if mlp is None:
            continue
        tiled = TiledLayer(mlp, setting, intermediate, norm_before_mlp(layer))
        mlp.forward = functools.partial(TiledLayer.forward, tiled)
        if tiled.norm is not None:
            tiled.norm.forward = functools.partial(TiledLayer.norm_forward, tiled)
        out[i] = tiled
    return out


def uninstall(tiled: dict[int, TiledLayer]) -> None:
    for t in tiled.values():
        for module in (t.mlp, t.norm):
            if module is not None and "forward" in module.__dict__:
                del module.forward


def intermediate_size(config, hidden: int) -> int:
    """The MLP width from an HF config (GPT-2 style configs: 4x hidden when unset)."""
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden
