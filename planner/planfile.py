"""Plan files: write, load (with schema checks) and match against the run that uses them. Torch-free.

The runtime calls these from ``memo.wrap`` when ``MemoConfig(plan="plan.json")`` is given::

    from memo.planner.planfile import load_plan, check_plan_matches, PlanFileError, PlanMismatch
    try:
        plan = load_plan(config.plan)
        check_plan_matches(plan, model=model_identity(model.config), seq_len=4096 * 256,
                           micro_batch=1, dtype="bf16", sp=8, sp_backend="ring")
    except (PlanFileError, PlanMismatch) as e:
        raise MemoError(str(e)) from e
    alpha = plan["alpha"]
    forward_offsets = {t["id"]: t["offset"] for t in plan["layer"]["forward"]["tensors"]}

``model_identity`` is ``memo.profile.model_identity`` (a dict of the shape-defining numbers).
``layer_policies`` (one of "memo", "input", "kept" per layer, the "kept" ones last) and
``tile_tokens`` (the MLP tile the plan's memory assumed; null: untiled) are checked when present;
plans written before them read as "memo" for every layer but the last ``keep_layers`` ("kept")
and untiled (``plan_layer_policies``, ``plan_tile_tokens``).
``offload_params`` (the weights on the host: ZeRO-3 with DeepSpeed's ``offload_param``) is checked when
present, with ``zero_stage`` and ``offload_optimizer``; plans without it kept the weights on the GPU
(``plan_offload_params``).
``sp_backend`` is checked only when given; plans written before the field existed were made
for the ring and read as ``"ring"`` (``plan_sp_backend``).

Layer tensors are listed in allocation order: ``f{k}`` / ``b{k}`` is the k-th storage the
layer's forward / backward allocates (``b`` ids first list the saved activations live when the
backward starts), with sizes rounded up to 512 bytes; parameter gradients are model states and
are left out, so some k are skipped. An allocator replaying the layer's requests in order can
take ``offset`` for the k-th request (``arena_phases``; which ones: NOTE [ Planned allocations ],
summarised in the file's ``layer.planned``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from .cost import SP_BACKENDS
from .policies import POLICIES
from .presets import IDENTITY_FIELDS, ModelBoundsError, check_model_bounds
from .plan import PLAN_VERSION


MAX_PLAN_BYTES = 64 << 20     # a plan is ~100 KB (7B at 1M tokens), a few MB at the model bounds


class PlanFileError(ValueError):
    """A plan file that cannot be read or does not follow the schema; the message says why."""


class PlanMismatch(ValueError):
    """A valid plan made for another model, length, batch, dtype, SP degree or SP backend."""


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

# Required top-level fields and their types.
_SCHEMA = {
    "memo_plan_version": int, "model": dict, "seq_len": int, "micro_batch": int, "dtype": str, "sp": int,
    "alpha": (int, float), "fits": bool, "predicted": dict, "layer": dict, "step": dict,
}
_LAYOUT_FIELDS = {"peak_bytes": int, "lower_bound_bytes": int, "solve_s": (int, float), "tensors": list}
_TENSOR_FIELDS = ("id", "bytes", "start", "end", "offset")


def write_plan(path: str, plan: dict) -> None:
    """Write ``plan`` as JSON (atomically: a half-written file never replaces a good one)."""
    _check_schema(plan, "the plan to write")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_plan(path: str) -> dict:
    """Read and validate a plan file; raises ``PlanFileError`` naming what is wrong and the fix."""
    plan = read_json(path, limit=MAX_PLAN_BYTES, what="plan file", error=PlanFileError,
                     fix=f"it is not a whole plan (a plan is a few MB at most): make it again with `memo plan ... "
                         f"--out {path}`")
    _check_schema(plan, f"plan file {path!r}")
    return plan


def read_json(path: str, *, limit: int, what: str, fix: str, error=PlanFileError):
    """The JSON in ``path``, read as at most ``limit`` bytes of UTF-8 (so a huge or binary file costs
    no more than ``limit``); ``error`` naming ``what``, the path, the problem and ``fix`` otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"memo.plan: cannot read {what} {path!r} ({e.strerror}); {fix}") from e
    if len(data) > limit:
        raise error(f"memo.plan: {what} {path!r} is larger than {limit:,} bytes; {fix}")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise error(f"memo.plan: {what} {path!r} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                    f"{fix}") from e
    except json.JSONDecodeError as e:
        raise error(f"memo.plan: {what} {path!r} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from e
    except RecursionError as e:
        raise error(f"memo.plan: {what} {path!r} nests too deeply to be JSON memo reads; {fix}") from e


def _check_schema(plan, where: str) -> None:
    fix = "make it again with `memo plan ... --out plan.json`"
    if not isinstance(plan, dict):
        raise PlanFileError(f"memo.plan: {where} holds a {type(plan).__name__}, not a plan object; {fix}")
    for key, typ in _SCHEMA.items():
        if key not in plan:
            raise PlanFileError(f"memo.plan: {where} lacks field {key!r}; {fix}")
        if not isinstance(plan[key], typ) or (typ is int and isinstance(plan[key], bool)):
            raise PlanFileError(f"memo.plan: {where}: field {key!r} is {plan[key]!r}, not of the expected type; {fix}")
    if plan["memo_plan_version"] != PLAN_VERSION:
        raise PlanFileError(f"memo.plan: {where} has plan version {plan['memo_plan_version']}, this memo reads "
                            f"version {PLAN_VERSION}; {fix}")
    missing = [k for k in IDENTITY_FIELDS if k not in plan["model"]]
    if missing:
        raise PlanFileError(f"memo.plan: {where}: model identity lacks {', '.join(missing)}; {fix}")
    try:
        check_model_bounds(plan["model"], f"memo.plan: {where}: model")
    except ModelBoundsError as e:
        raise PlanFileError(f"{e}; or {fix}") from e
    if plan_sp_backend(plan) not in SP_BACKENDS:
        raise PlanFileError(f"memo.plan: {where}: sp_backend {plan['sp_backend']!r} is not one of "
                            f"{', '.join(SP_BACKENDS)}; {fix}")
    if not 0.0 <= float(plan["alpha"]) <= 1.0:
        raise PlanFileError(f"memo.plan: {where}: alpha {plan['alpha']} is outside [0, 1]; {fix}")
    _check_policies(plan, where, fix)
    _check_offload(plan, where, fix)
    for part in ("forward", "backward"):
        layout = plan["layer"].get(part)
        if not isinstance(layout, dict):
            raise PlanFileError(f"memo.plan: {where} lacks layer.{part}; {fix}")
        for key, typ in _LAYOUT_FIELDS.items():
            if not isinstance(layout.get(key), typ):
                raise PlanFileError(f"memo.plan: {where}: layer.{part}.{key} is missing or malformed; {fix}")
        for t in layout["tensors"]:
            if not isinstance(t, dict) or any(k not in t for k in _TENSOR_FIELDS):
                raise PlanFileError(f"memo.plan: {where}: a tensor of layer.{part} lacks one of "
                                    f"{_TENSOR_FIELDS}; {fix}")
            if t["offset"] < 0 or t["offset"] + t["bytes"] > layout["peak_bytes"]:
                raise PlanFileError(f"memo.plan: {where}: tensor {t['id']!r} of layer.{part} lies outside its arena "
                                    f"[0, {layout['peak_bytes']}); {fix}")
    for key in ("peak_bytes", "lower_bound_bytes"):
        if not isinstance(plan["step"].get(key), int):
            raise PlanFileError(f"memo.plan: {where}: step.{key} is missing or malformed; {fix}")


def _check_offload(plan: dict, where: str, fix: str) -> None:
    """``zero_stage``, ``offload_optimizer`` and ``offload_params``, where present: booleans, and parameter
    offload only at ZeRO stage 3 with the optimizer offloaded (NOTE [ Parameter offload ] rule 3 in
    cost.py). Plans older than ``offload_params`` kept the weights on the GPU."""
    for key in ("offload_optimizer", "offload_params"):
        if key in plan and not isinstance(plan[key], bool):
            raise PlanFileError(f"memo.plan: {where}: {key} {plan[key]!r} is not true or false; {fix}")
    stage = plan.get("zero_stage")
    if stage is not None and (not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        raise PlanFileError(f"memo.plan: {where}: zero_stage {stage!r} is not 0, 1, 2 or 3; {fix}")
    if plan.get("offload_params") and (stage != 3 or not plan.get("offload_optimizer")):
        raise PlanFileError(f"memo.plan: {where}: offload_params needs zero_stage 3 and offload_optimizer, the plan "
                            f"has zero_stage {stage!r} and offload_optimizer {plan.get('offload_optimizer')!r}; {fix} "
                            f"--offload-optimizer --offload-params")


def plan_offload_params(plan: dict) -> bool:
    """Whether the plan keeps the weights on the host (plans older than the field did not)."""
    return bool(plan.get("offload_params", False))


def _check_policies(plan: dict, where: str, fix: str) -> None:
    """``layer_policies``, ``keep_layers`` and ``tile_tokens``, where present (see the module docstring)."""
    n = plan["model"]["layers"]
    keep = plan.get("keep_layers")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= n):
        raise PlanFileError(f"memo.plan: {where}: keep_layers {keep!r} is not an int in [0, {n}]; {fix}")
    tile = plan.get("tile_tokens")
    if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0):
        raise PlanFileError(f"memo.plan: {where}: tile_tokens {tile!r} is neither null (untiled) nor a positive "
                            f"int; {fix}")
    if "layer_policies" not in plan:
        return
    pol = plan["layer_policies"]
    if not isinstance(pol, list) or len(pol) != n:
        raise PlanFileError(f"memo.plan: {where}: layer_policies must list one policy for each of the model's {n} "
                            f"layers, got {pol!r:.80}; {fix}")
    bad = sorted({str(p) for p in pol if p not in POLICIES})
    if bad:
        raise PlanFileError(f"memo.plan: {where}: layer_policies holds {', '.join(map(repr, bad))}, not one of "
                            f"{', '.join(POLICIES)}; {fix}")
    kept = pol.count("kept")
    if pol[n - kept:] != ["kept"] * kept:
        raise PlanFileError(f"memo.plan: {where}: layer_policies has \"kept\" layers before swapped ones; the "
                            f"kept layers are the last ones; {fix}")
    if keep is not None and kept != keep:
        raise PlanFileError(f"memo.plan: {where}: layer_policies keeps {kept} layers, keep_layers says {keep}; {fix}")


def plan_layer_policies(plan: dict) -> list[str]:
    """The plan's policy per layer; plans older than the field: "memo" but the last ``keep_layers``."""
    if "layer_policies" in plan:
        return list(plan["layer_policies"])
    n = plan["model"]["layers"]
    keep = min(int(plan.get("keep_layers", 2)), n)
    return ["memo"] * (n - keep) + ["kept"] * keep


def plan_tile_tokens(plan: dict):
    """The MLP tile the plan assumed (None: untiled; plans older than the field were untiled)."""
    return plan.get("tile_tokens")


def _dtype(d: str) -> str:
    d = str(d).replace("torch.", "").lower()
    return _DTYPE_ALIASES.get(d, d)


def plan_sp_backend(plan: dict) -> str:
    """The plan's SP backend; plans older than the field were made for the ring."""
    return plan.get("sp_backend", "ring")


def check_plan_matches(plan: dict, *, model: dict, seq_len: int, micro_batch: int, dtype: str, sp: int,
                       sp_backend: Optional[str] = None) -> None:
    """Raise ``PlanMismatch`` naming every field where ``plan`` differs from this run
    (expected = the plan's value, actual = this run's). ``sp_backend`` is compared only when
    given: it changes the plan's buffers and times, not the shapes the other fields pin."""
    diffs = []
    for key in IDENTITY_FIELDS:
        if key in model and plan["model"].get(key) != model[key]:
            diffs.append(f"model.{key}: plan {plan['model'].get(key)!r}, run {model[key]!r}")
    for key, actual in (("seq_len", seq_len), ("micro_batch", micro_batch), ("sp", sp)):
        if plan[key] != actual:
            diffs.append(f"{key}: plan {plan[key]!r}, run {actual!r}")
    if sp_backend is not None and plan_sp_backend(plan) != sp_backend:
        diffs.append(f"sp_backend: plan {plan_sp_backend(plan)!r}, run {sp_backend!r}")
    if _dtype(plan["dtype"]) != _dtype(dtype):
        diffs.append(f"dtype: plan {plan['dtype']!r}, run {_dtype(dtype)!r}")
    if diffs:
        raise PlanMismatch("memo.plan: the plan was made for another job (" + "; ".join(diffs) + "); make a plan "
                           "for this job with `memo plan` using these values, or drop MemoConfig(plan=...)")


# --- which allocations the run-time arena serves --------------------------------------------------

# NOTE [ Planned allocations ]
#   The runtime arena (memo/planned_memory.py, csrc/arena.h) replays a layer's requests by
#   index within a phase (NOTE [ Arena replay ]). The k-th request is the tensor ``f{n}`` /
#   ``b{n}`` with the k-th smallest n among the requests, where:
#   1. a tensor is not a request when it exists before the phase (``op`` "carried": saved
#      activations memo restores itself; "argument": the layer input), when it is the
#      profiler's gradient seed (``op`` "ones_like" at step 0 of the backward: in a run that
#      gradient comes from the layer above), or when it is modelled rather than allocated in op
#      order (``MODELLED_KINDS``: SP buffers the planner adds at the attention step);
#   2. an id number missing from the layout (a parameter gradient: a model state the planner
#      leaves out) is a request the arena leaves to the fallback (unplanned), so the requests
#      after it keep their index. Its size is in ``layer.param_grads`` (``param_grad_requests``),
#      so the arena matches it like any other request: a size-less slot matches nothing, and
#      the gradient (the 256 B of a norm weight) then took the next slot of its rounded size
#      and shifted every later request of the phase (measured: half the backward's hits lost).
#      Plans written before the field have no sizes; their gradients stay insertions;
#   3. a request that outlives the phase (``end`` equals the block's last step: the layer
#      output, saved activations, the input gradient) is unplanned too: a span held across
#      phases would collide with the next phase's plan;
#   4. every other request is planned: served at its ``offset``, matched against the request
#      rounded up to ``ARENA_ALIGNMENT`` bytes, as PyTorch's allocator rounds (the planner
#      rounds the plan's sizes the same way).
#   Library workspaces (cuBLAS, cuDNN) are absent from the trace: they arrive as extra requests,
#   go to the fallback as misses and shift the requests after them within the phase.

ARENA_ALIGNMENT = 512
MODELLED_KINDS = ("ring_buffer", "ulysses_buffer")
_NOT_REQUESTS = ("carried", "argument")
_GRAD_SEED_OP = "ones_like"
LAYER_PHASES = ("forward", "backward")
_ID = re.compile(r"^[fb](\d+)$")


def _is_request(t: dict, part: str) -> bool:
    """Rule 1."""
    if t.get("op") in _NOT_REQUESTS or t.get("kind", "other") in MODELLED_KINDS or not _ID.match(t["id"]):
        return False
    return not (part == "backward" and t.get("op") == _GRAD_SEED_OP and t["start"] == 0)


def param_grad_requests(profile: dict) -> dict:
    """``{part: {id: bytes}}``: the parameter gradients a layer's forward / backward allocates,
    rounded as the arena rounds requests; a plan keeps them as ``layer.param_grads`` (rule 2)."""
    return {part: {a["id"]: -(-a["bytes"] // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
                   for a in profile[part]["allocs"] if a["kind"] == "param_grad"}
            for part in LAYER_PHASES}


def _phase_slots(plan: dict, part: str) -> list[tuple[dict, str]]:
    """Per request index: (tensor, why it is unplanned or ""); a parameter gradient missing from
    the layout is ``{"id", "bytes"}`` (bytes 0 when the plan does not record it)."""
    tensors = plan["layer"][part]["tensors"]
    grads = plan["layer"].get("param_grads", {}).get(part, {})
    last = max((t["end"] for t in tensors), default=0)
    by_n = {int(_ID.match(t["id"]).group(1)): t for t in tensors if _ID.match(t["id"])}
    skip = {n for n, t in by_n.items() if not _is_request(t, part)}
    count = max([*by_n, *(int(_ID.match(i).group(1)) for i in grads)], default=-1) + 1
    slots = []
    for n in range(count):
        if n in skip:
            continue
        t = by_n.get(n)
        if t is None:
            tid = f"{part[0]}{n}"
            slots.append(({"id": tid, "bytes": grads.get(tid, 0)}, "param_grad"))   # rule 2
        elif t["end"] >= last or t["bytes"] == 0:
            slots.append((t, t.get("kind", "other")))                              # rule 3
        else:
            slots.append((t, ""))                                       # rule 4
    return slots


def planned_allocations(plan: dict) -> dict:
    """Per layer phase: how many requests and bytes the arena serves, and what it leaves to the
    fallback, by kind. See NOTE [ Planned allocations ]."""
    out = {}
    for part in LAYER_PHASES:
        slots = _phase_slots(plan, part)
        planned = [t for t, why in slots if not why]
        left: dict[str, dict] = {}
        for t, why in slots:
            if why:
                entry = left.setdefault(why, {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += t["bytes"]
        out[part] = {"requests": len(slots), "planned_count": len(planned),
                     "planned_bytes": sum(t["bytes"] for t in planned),
                     "planned_peak_bytes": max((t["offset"] + t["bytes"] for t in planned), default=0),
                     "unplanned_by_kind": left, "alignment": ARENA_ALIGNMENT}
    return out


def arena_phases(plan: dict) -> tuple[int, list[list[tuple[Optional[int], int]]]]:
    """``(arena_bytes, phases)`` for ``memo.arena.ArenaPlan``: phase 0 is the layer's forward,
    phase 1 its backward; each lists ``(offset, bytes)`` per request, ``offset`` None for an
    unplanned one. The arena is as large as the highest planned span of either phase."""
    phases = []
    for part in LAYER_PHASES:
        phases.append([(None if why else t["offset"], t["bytes"]) for t, why in _phase_slots(plan, part)])
    arena = max((off + size for ph in phases for off, size in ph if off is not None), default=0)
    return arena, phases
