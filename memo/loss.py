"""Chunked LM head + causal-LM loss: (sequence x vocabulary) logits never exist.

``chunked_causal_lm_loss(hidden, weight, labels, chunk_size=...)`` equals transformers'
``ForCausalLMLoss(hidden @ weight.T (+ bias), labels, vocab)`` -- labels shifted left by one and
padded with ``ignore_index``, logits upcast to fp32, ``sum / num_items_in_batch`` when that is
given, else the mean over non-ignored tokens -- but builds the logits ``chunk_size`` tokens at a
time, so its peak memory is O(chunk_size x vocab) instead of O(batch x seq x vocab).

The maths is in two plain functions, :func:`chunked_loss_forward` and
:func:`chunked_loss_backward`; :class:`ChunkedLMLossFunction` only moves tensors through ``ctx``.

NOTE [ Chunked loss: recompute logits in backward ]
  1. Forward keeps, per token, only the fp32 log-sum-exp of its logits (``batch * seq * 4`` bytes);
     the logits of a chunk die with the chunk.
  2. Backward rebuilds each chunk's logits from the saved ``hidden`` and ``weight`` (both are
     alive anyway: ``hidden`` is the final norm's output, ``weight`` a parameter), turns them into
     ``softmax - onehot`` with the saved log-sum-exp, and accumulates ``grad_hidden``,
     ``grad_weight`` (fp32) and ``grad_bias`` chunk by chunk.
  3. Why not compute the gradients during forward (the Liger kernel way, one head GEMM fewer)?
     Because then a (vocab x hidden) fp32 ``grad_weight`` and a (batch x seq x hidden)
     ``grad_hidden`` are allocated at the end of forward -- exactly the moment the step's memory
     peaks (every layer's activations are still resident) -- and are paid for even when no backward
     follows (evaluation under ``torch.enable_grad``, or a skipped step). The price here is one extra
     (chunk x hidden x vocab) GEMM per chunk, a few percent of a step at the sequence lengths memo
     is for, where attention dominates.
  4. Chunks run over the flattened ``batch * seq`` tokens, so a chunk may span two rows; the
     last chunk may be shorter.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from memo.errors import MemoError

__all__ = [
    "ChunkedLMLossFunction",
    "NormedChunkedLMLossFunction",
    "chunked_causal_lm_loss",
    "chunked_loss_backward",
    "chunked_loss_forward",
    "head_options_from_config",
]


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], logit_scale: Optional[float],
                  softcap: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """fp32 logits of one chunk, computed in the order the HF models use.

    h: (c, hidden); weight: (vocab, hidden). Returns (logits (c, vocab) fp32, tanh (c, vocab) or
    None). The head GEMM, the scale (Cohere's ``logit_scale``) and the soft-cap (Gemma2's
    ``final_logit_softcapping``: ``tanh(z / cap) * cap``) run in the compute dtype like the models
    do; the upcast to fp32 (see :func:`_acc_dtype`) comes last, like ``ForCausalLMLoss``'s ``logits.float()``.
    """
    z = torch.nn.functional.linear(h, weight, bias)
    if logit_scale is not None:
        z = z * logit_scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    return z.to(_acc_dtype(z.dtype)), t


def _autocast_of(t: Tensor) -> tuple:
    """(device type, enabled, dtype) of autocast now, for a Function's backward to re-enter."""
    dev = t.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the loss and per-token log-sum-exp accumulate in: see :func:`_acc_dtype`."""
    dev, enabled, dtype = _autocast_of(hidden)
    return _acc_dtype(dtype if enabled else hidden.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 (``ForCausalLMLoss``'s ``logits.float()``); fp64 stays fp64.

    HF would round fp64 logits down to fp32; keeping fp64 lets the tests use an fp64 reference and
    ``torch.autograd.gradcheck``. Nobody trains in fp64, so no training run sees a difference.
    """
    return torch.promote_types(dtype, torch.float32)


def chunked_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                         chunk_size: int, ignore_index: int = -100, logit_scale: Optional[float] = None,
                         softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Sum of per-token cross entropies over the non-ignored targets, and the per-token LSE.

    hidden: (tokens, hidden); weight: (vocab, hidden); bias: (vocab,) or None;
    targets: (tokens,) int64, already shifted (``ignore_index`` where no loss is taken).
    Returns ``(loss_sum, lse)``: loss_sum a fp32 scalar, lse (tokens,) fp32 (both fp64 for fp64
    inputs, see :func:`_acc_dtype`) -- the aux that
    :func:`chunked_loss_backward` needs (see NOTE [ Chunked loss: recompute logits in backward ]).
    """
    n = hidden.shape[0]
    acc = _loss_dtype(hidden)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z, _ = _chunk_logits(hidden[start:end], weight, bias, logit_scale, softcap)
        tgt = targets[start:end]
        valid = tgt != ignore_index
        safe = torch.where(valid, tgt, torch.zeros_like(tgt))
        chunk_lse = torch.logsumexp(z, dim=-1)
        lse[start:end] = chunk_lse
        picked = z.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss_sum += torch.where(valid, chunk_lse - picked, torch.zeros_like(chunk_lse)).sum()
        del z
    return loss_sum, lse


def chunked_loss_backward(grad_loss_sum: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                          targets: Tensor, lse: Tensor, *, chunk_size: int, ignore_index: int = -100,
                          logit_scale: Optional[float] = None, softcap: Optional[float] = None,
                          needs_grad: tuple[bool, bool, bool] = (True, True, True),
                          ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``loss_sum`` w.r.t. (hidden, weight, bias), chunk by chunk.

    grad_loss_sum: scalar (the incoming gradient); other arguments as in
    :func:`chunked_loss_forward`, lse its aux. ``needs_grad`` says which of the three to compute.
    Returns (grad_hidden (tokens, hidden) in hidden's dtype, grad_weight (vocab, hidden) in
    weight's dtype -- accumulated over chunks in fp32 --, grad_bias (vocab,) or None).
    """
    need_h, need_w, need_b = needs_grad
    need_b = need_b and bias is not None
    n = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_h else None
    acc = lse.dtype
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    g = grad_loss_sum.to(acc)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        z, t = _chunk_logits(h, weight, bias, logit_scale, softcap)
        tgt = targets[start:end]
        valid = tgt != ignore_index
        safe = torch.where(valid, tgt, torch.zeros_like(tgt))
        # d(lse - z[target]) / dz = softmax(z) - onehot(target); zero on ignored tokens.
        dz = torch.exp_(z.sub_(lse[start:end].unsqueeze(1)))
        dz.scatter_add_(1, safe.unsqueeze(1), torch.full((end - start, 1), -1.0, dtype=acc, device=dz.device))
        dz.mul_((valid.to(acc) * g).unsqueeze(1))
        if softcap is not None:
            dz.mul_(1.0 - t.to(acc).square())  # d(cap * tanh(u / cap)) / du
        if logit_scale is not None:
            dz.mul_(logit_scale)
        if need_b:
            grad_bias.add_(dz.sum(0))
        # The two GEMMs run in the head's compute dtype, like the plain model's backward.
        dz = dz.to(h.dtype if not torch.is_autocast_enabled(h.device.type) else
                   torch.get_autocast_dtype(h.device.type))
        del z, t
        if need_h:
            grad_hidden[start:end] = torch.mm(dz, weight.to(dz.dtype))
        if need_w:
            if dz.dtype == acc and h.dtype == acc:
                grad_weight.addmm_(dz.t(), h)      # no (vocab x hidden) temporary
            else:
                grad_weight.add_(torch.mm(dz.t(), h.to(dz.dtype)))
        del dz
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class ChunkedLMLossFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`chunked_loss_forward` / :func:`chunked_loss_backward`.

    Returns the *sum* of the per-token losses; the reduction (mean or ``/ num_items_in_batch``)
    is applied outside by :func:`chunked_causal_lm_loss` with ordinary torch ops.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, logit_scale, softcap):
        loss_sum, lse = chunked_loss_forward(hidden, weight, bias, targets, chunk_size=chunk_size,
                                             ignore_index=ignore_index, logit_scale=logit_scale,
                                             softcap=softcap)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.opts = dict(chunk_size=chunk_size, ignore_index=ignore_index, logit_scale=logit_scale,
                        softcap=softcap)
        ctx.autocast = _autocast_of(hidden)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss_sum):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, enabled=enabled, dtype=dtype):
            gh, gw, gb = chunked_loss_backward(grad_loss_sum, hidden, weight, bias, targets, lse,
                                               needs_grad=tuple(ctx.needs_input_grad[:3]), **ctx.opts)
        return gh, gw, gb, None, None, None, None, None


class NormedChunkedLMLossFunction(torch.autograd.Function):
    """The chunked loss with the final norm inside it (NOTE [ Chunked loss with the final norm ]).

    NOTE [ Chunked loss with the final norm ]
      1. The decoder's final norm acts on each token alone, so ``norm(hidden)[a:b]`` is
         ``norm(hidden[a:b])``; memo runs it chunk by chunk inside the loss, and the normed hidden
         states of the whole sequence, the norm's fp32 intermediates and the (tokens x hidden)
         gradient of its output never exist at once: forward keeps only the norm's input (already
         alive: the last layer's output) and the per-token log-sum-exp.
      2. Backward reruns the norm on each chunk (one elementwise pass per token, a fraction of a
         percent of a step), takes the chunk's loss gradient through it with autograd, and
         accumulates the norm's parameter gradients in fp32 (like the head's), returned as this
         Function's gradients, so every framework's gradient hooks see one gradient per parameter.
      3. Forward values equal the unfused model's (the same per-token ops); the parameter
         gradients are sums over chunks, so they differ from one sum over the sequence by
         rounding only (within twice the plain fp32 model's error; tests/test_loss.py).
    """

    @staticmethod
    def _starts(n: int, opts: dict) -> list[int]:
        """Where the chunks start. ``opts["profile_chunks"] = k`` (memo plan's profile, memo/profile.py):
        the first k - 1 chunks and the last only -- the others allocate as those do -- so profiling a
        million-token head takes k chunks' ops; the loss it computes is then not the model's."""
        starts = list(range(0, n, opts["chunk_size"]))
        k = opts.get("profile_chunks")
        return starts if not k or len(starts) <= k else starts[:k - 1] + starts[-1:]

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, norm, opts, *norm_params):
        n = hidden.shape[0]
        chunk = opts["chunk_size"]
        loss_opts = {k: v for k, v in opts.items() if k != "profile_chunks"}
        lse = torch.empty(n, dtype=_loss_dtype(hidden), device=hidden.device)
        total = None
        call, _ = _norm_call(norm)   # (its weights gathered by the caller, chunked_causal_lm_loss)
        starts = NormedChunkedLMLossFunction._starts(n, opts)
        for start in starts:
            y = call(hidden[start:start + chunk])
            loss_sum, lse[start:start + chunk] = chunked_loss_forward(y, weight, bias, targets[start:start + chunk],
                                                                      **loss_opts)
            total = loss_sum if total is None else total.add_(loss_sum)   # in order, as the unfused loss sums
            del y
        # The norm's parameters are not saved: backward reads them from the module, gathered (ZeRO-3).
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.norm, ctx.opts, ctx.starts = norm, loss_opts, starts
        ctx.autocast = _autocast_of(hidden)
        return total

    @staticmethod
    def backward(ctx, grad_loss_sum):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        call, gathered = _norm_call(ctx.norm)
        with gathered():
            return NormedChunkedLMLossFunction._backward(ctx, grad_loss_sum, hidden, weight, bias, targets, lse, call)

    @staticmethod
    def _backward(ctx, grad_loss_sum, hidden, weight, bias, targets, lse, call):
        dev, enabled, dtype = ctx.autocast
        chunk = ctx.opts["chunk_size"]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        norm_params = list(ctx.norm.parameters())
        shapes = [(p.shape, p.dtype, p.device) for p in norm_params]
        wanted = [p for p, need in zip(norm_params, ctx.needs_input_grad[6:]) if need]
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        grad_params = [torch.zeros(shape, dtype=acc, device=device)
                       for (shape, _, device), need in zip(shapes, ctx.needs_input_grad[6:]) if need]
        for start in ctx.starts:
            end = min(start + chunk, hidden.shape[0])
            x = hidden[start:end].detach().requires_grad_(need_h)
            with torch.enable_grad(), torch.autocast(dev, enabled=enabled, dtype=dtype):
                y = call(x)
            with torch.autocast(dev, enabled=enabled, dtype=dtype):
                gy, gw, gb = chunked_loss_backward(grad_loss_sum, y.detach(), weight, bias, targets[start:end],
                                                   lse[start:end], needs_grad=(True, need_w, need_b), **ctx.opts)
            if gw is not None:
                grad_weight.add_(gw)
            if gb is not None:
                grad_bias.add_(gb)
            inputs = ([x] if need_h else []) + wanted
            if inputs:
                grads = torch.autograd.grad(y, inputs, gy, allow_unused=True)
                if need_h:
                    grad_hidden[start:end] = grads[0]
                    grads = grads[1:]
                for acc_grad, g in zip(grad_params, grads):
                    if g is not None:
                        acc_grad.add_(g)
            del x, y, gy
        it = iter(grad_params)
        param_grads = [next(it).to(dtype_) if need else None
                       for (_, dtype_, _), need in zip(shapes, ctx.needs_input_grad[6:])]
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, *param_grads)


def _norm_call(norm: torch.nn.Module):
    """``(call, gathered)``: how the fused loss runs the final norm. Under DeepSpeed ZeRO-3 the norm's
    weights are partitioned outside its forward, and the loss runs it in backward too: ``gathered()``
    holds them whole (``deepspeed.zero.GatheredParameters``) and ``call`` is the module's forward
    without its hooks (the hooks would release them at the end of each call). Elsewhere the module
    is called as usual and ``gathered()`` does nothing."""
    import contextlib
    params = list(norm.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return norm, contextlib.nullcontext
    import deepspeed
    forward = type(norm).forward.__get__(norm)   # memo.wrap's override of norm.forward is an instance attribute
    return forward, lambda: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _fail(msg: str) -> MemoError:
    return MemoError(f"memo.loss: {msg}")


def _validate(hidden: Tensor, weight: Tensor, labels: Optional[Tensor], shift_labels: Optional[Tensor],
              bias: Optional[Tensor], chunk_size: int, logit_scale, softcap) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise _fail(f"chunk_size={chunk_size!r} must be a positive int; pass e.g. chunk_size=4096 "
                    f"(tokens per chunk of the LM head)")
    if hidden.dim() != 3:
        raise _fail(f"hidden has shape {tuple(hidden.shape)}, expected (batch, seq, hidden); pass the "
                    f"decoder's last hidden state")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise _fail(f"weight has shape {tuple(weight.shape)}, expected (vocab, {hidden.shape[2]}) to match "
                    f"hidden {tuple(hidden.shape)}; pass lm_head.weight")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise _fail(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},); pass lm_head.bias")
    if (labels is None) == (shift_labels is None):
        raise _fail("pass exactly one of labels (unshifted) and shift_labels (already shifted)")
    lab = labels if labels is not None else shift_labels
    name = "labels" if labels is not None else "shift_labels"
    if tuple(lab.shape) != tuple(hidden.shape[:2]):
        raise _fail(f"{name} has shape {tuple(lab.shape)} but hidden has (batch, seq) = "
                    f"{tuple(hidden.shape[:2])}; pass one label per position of hidden")
    if lab.dtype not in (torch.int64, torch.int32):
        raise _fail(f"{name} has dtype {lab.dtype}; pass integer token ids (torch.long)")
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
        raise _fail(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast hidden to the head's dtype "
                    f"or run under torch.autocast")
    if logit_scale is not None and not isinstance(logit_scale, (int, float)):
        raise _fail(f"logit_scale={logit_scale!r} must be a number or None")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
        raise _fail(f"softcap={softcap!r} must be a positive number or None")


def chunked_causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Optional[Tensor], *, chunk_size: int,
                           bias: Optional[Tensor] = None,
                           num_items_in_batch: Union[int, Tensor, None] = None,
                           ignore_index: int = -100, shift_labels: Optional[Tensor] = None,
                           logit_scale: Optional[float] = None, softcap: Optional[float] = None,
                           norm: Optional[torch.nn.Module] = None) -> Tensor:
    """Causal-LM loss of ``linear(hidden, weight, bias)`` without materialising the logits.

    hidden: (batch, seq, hidden); weight: (vocab, hidden), e.g. ``lm_head.weight`` (tied to the
    embedding or not); bias: (vocab,) or None; labels: (batch, seq) unshifted token ids, with
    ``ignore_index`` where no loss is taken -- or ``shift_labels`` (batch, seq) already shifted,
    as HF passes them under context parallelism. ``logit_scale`` (Cohere) and ``softcap``
    (Gemma2/3 ``final_logit_softcapping``) reproduce those models' heads; see
    :func:`head_options_from_config`. ``norm``: the decoder's final norm, when ``hidden`` is its
    input: it then runs chunk by chunk inside the loss (NOTE [ Chunked loss with the final norm ]).

    Returns a fp32 scalar equal to transformers' ``ForCausalLMLoss``: the sum over non-ignored
    tokens divided by ``num_items_in_batch`` if given, else their mean (NaN when every token is
    ignored, like ``cross_entropy``). Raises :class:`memo.errors.MemoError` on bad input.
    Label values are not range-checked (that would cost a device sync); an id >= vocab fails in
    ``gather`` like it fails in ``cross_entropy``.
    """
    _validate(hidden, weight, labels, shift_labels, bias, chunk_size, logit_scale, softcap)
    if shift_labels is None:
        padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    targets = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    flat = hidden.reshape(-1, hidden.shape[-1])
    logit_scale = None if logit_scale is None else float(logit_scale)
    softcap = None if softcap is None else float(softcap)
    if norm is not None:
        opts = dict(chunk_size=chunk_size, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap)
        with _norm_call(norm)[1]():   # ZeRO-3: the norm's weights whole while the Function records them
            loss_sum = NormedChunkedLMLossFunction.apply(flat, weight, bias, targets, norm, opts, *norm.parameters())
    else:
        loss_sum = ChunkedLMLossFunction.apply(flat, weight, bias, targets, chunk_size, ignore_index, logit_scale,
                                               softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    return loss_sum / (targets != ignore_index).sum()


def head_options_from_config(config) -> dict:
    """``logit_scale`` / ``softcap`` keyword arguments for a HF model config's LM head.

    Cohere multiplies the logits by ``config.logit_scale``; Gemma2/3 (and others) soft-cap them
    with ``config.final_logit_softcapping``. Unknown head transforms are not guessed: this only reads
    those two attributes, and returns ``{}`` for plain heads (Llama, Mistral, Qwen).
    """
    out = {}
    text = getattr(config, "get_text_config", lambda: config)()
    scale = getattr(text, "logit_scale", None)
    if scale is not None:
        out["logit_scale"] = float(scale)
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        out["softcap"] = float(cap)
    return out
