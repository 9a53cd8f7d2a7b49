"""Step time and activation residency of memo against the usual ways of saving activation memory.

Trains one small Llama (built from a config, fixed seeds, synthetic token ids) under:

    none                   no memory saving
    hf-checkpoint          HF activation checkpointing on every decoder layer
                           (``activation_checkpointing_enable()``; ``gradient_checkpointing_enable()``
                           is its deprecated alias in transformers 5.23)
    hf-checkpoint-every-2  the same with ``every_n_layers=2`` -- transformers 5.23 has the option
                           natively: layers 0, 2, 4, ... are checkpointed, the others keep activations
    save-on-cpu            ``torch.autograd.graph.save_on_cpu(pin_memory=False)``
    memo-R                 ``memo.wrap(model, MemoConfig(swap_ratio=R, loss_chunk_size=None,
                           host_memory_budget="8GiB"))`` for R in --memo-ratios (0.0, 0.5, 1.0)

For each method and sequence length: one warm-up step, then the median of ``--steps`` timed steps
(forward, backward, SGD update) and its ratio to ``none`` at the same length, measured in the same
run. Timed steps are interleaved across methods (see ``run_seq_len``). Then one more, untimed
forward and backward measures residency with memo.memtrack (independent of memo's
own counters; see NOTE [ What memtrack counts ] in memo/memtrack.py):

NOTE [ Resident and host bytes in this benchmark ]
  1. resident_bytes: bytes of the storages created during the forward pass that are still alive
     when it returns -- the activations the autograd graph holds, plus the 0-dim loss. Every
     method computes the full-vocabulary loss (loss_chunk_size=None), so every row includes the
     log-softmax the loss saves (tokens x vocab x 4 B).
  2. host_bytes: for save-on-cpu, the alive storages its pack hook returned or created (tagged
     "host" and so excluded from resident_bytes). On a CPU-only machine ``save_on_cpu`` moves
     nothing -- ``tensor.cpu()`` returns the tensor itself, as torch documents -- so its
     "host" bytes are the activations themselves and its step time is ``none`` plus hook
     overhead; on a GPU box the same accounting gives the pinned copies.
  3. host_bytes for memo: ``memo.stats(model).host_pool["used_bytes"]`` right after the forward
     (swapped activations waiting for their backward). The pool itself is allocated once, in the
     warm-up step, so it is never counted as resident (it existed before the measured forward).
     ``host_reserved_bytes`` is the pool's size; ``memo_reported_resident_bytes`` memo's own
     counter, for comparison with the independent measurement.
  4. On this machine "device" and "host" are the same DRAM; the split above is what each method
     would hold on an accelerator and what it would hold in host memory.

    python benchmarks/swap.py [--seq-lens 2048 4096] [--layers 4] [--hidden 256] [--steps 3] [--json PATH]

The defaults finish in a few minutes on 2 CPU cores; ``--seq-lens 8192 16384`` takes about an hour
there (attention is quadratic). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import os
import sys

# Run as `python benchmarks/swap.py`, this directory is sys.path[0], and benchmarks/copy.py there
# would shadow the standard library's `copy` module (which torch imports). Drop it first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import memo  # noqa: E402
from memo.memtrack import StorageTracker, track_storages  # noqa: E402

BASELINES = ("none", "hf-checkpoint", "hf-checkpoint-every-2", "save-on-cpu")
HOST_TAG = "host"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memo_available() -> bool:
    """memo rows run once the runtime's ``memo.wrap`` exists."""
    return hasattr(memo, "wrap") and hasattr(memo, "stats")


def build_model(args, seq_len: int) -> LlamaForCausalLM:
    """The same weights for every method: the seed is reset before construction."""
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * 8 / 3 + 63) // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=seq_len,
                      use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).train()


class Method:
    """How one row prepares the model and what it wraps each forward in."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ratio: Optional[float] = float(name.split("-", 1)[1]) if name.startswith("memo-") else None

    def prepare(self, model: LlamaForCausalLM) -> None:
        if self.name == "hf-checkpoint":
            model.activation_checkpointing_enable()
        elif self.name == "hf-checkpoint-every-2":
            model.activation_checkpointing_enable(every_n_layers=2)
        elif self.ratio is not None:
            memo.wrap(model, memo.MemoConfig(swap_ratio=self.ratio, loss_chunk_size=None,
                                             host_memory_budget="8GiB"))

    def forward_context(self, tracker: Optional[StorageTracker]):
        if self.name != "save-on-cpu":
            return contextlib.nullcontext()
        hooks = torch.autograd.graph.save_on_cpu(pin_memory=False)
        if tracker is not None:
            hooks.pack_hook = _tagging_pack(hooks.pack_hook, tracker)
        return hooks

    def host_bytes(self, model, tracker: StorageTracker) -> tuple[int, Optional[int], Optional[int]]:
        """(host bytes, pool reserved bytes, memo's own resident counter) right after the forward."""
        if self.name == "save-on-cpu":
            return tracker.alive_bytes(tags=[HOST_TAG]), None, None
        if self.ratio is not None:
            st = memo.stats(model)
            pool = st.to_dict()["host_pool"]
            return pool["used_bytes"], pool["reserved_bytes"], st.resident_bytes
        return 0, None, None


def _tagging_pack(pack: Callable, tracker: StorageTracker) -> Callable:
    """save_on_cpu's pack hook, with what it creates or returns tagged as host memory
    (NOTE [ Resident and host bytes in this benchmark ] rule 2)."""
    def tagged(tensor):
        with tracker.tag(HOST_TAG):
            device, packed = pack(tensor)
        tracker.mark(packed, HOST_TAG)
        return device, packed
    return tagged


def train_step(model, opt, ids, ctx) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with ctx:
        loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


class Run:
    """One method's model, optimizer and timings at one sequence length."""

    def __init__(self, method: Method, seq_len: int, args) -> None:
        self.method, self.seq_len = method, seq_len
        self.model = build_model(args, seq_len)
        method.prepare(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.ids = torch.randint(0, args.vocab, (args.batch, seq_len),
                                 generator=torch.Generator().manual_seed(args.seed + 1))
        self.times: list[float] = []
        self.first_loss = self.step()          # warm-up: memo traces its layers and sizes its pool here

    def step(self) -> float:
        return train_step(self.model, self.opt, self.ids, self.method.forward_context(None)).item()

    def timed_step(self) -> None:
        gc.collect()
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)

    def measure(self) -> dict:
        """One more, untimed forward under the tracker (NOTE [ Resident and host bytes ... ])."""
        method, model = self.method, self.model
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        with track_storages() as tracker:
            with method.forward_context(tracker):
                loss = model(self.ids, labels=self.ids).loss
        resident = tracker.alive_bytes(exclude_tags=[HOST_TAG])
        host, reserved, reported = method.host_bytes(model, tracker)
        loss.backward()
        del loss
        leftover = tracker.alive_bytes()
        assert leftover <= 64, f"{method.name}: {leftover} B of forward storages outlived the backward\n" \
                               f"{tracker.summary()}"
        if method.ratio is not None:
            memo.unwrap(model)
        return {"method": method.name, "seq_len": self.seq_len, "step_s": statistics.median(self.times),
                "ratio": None, "resident_bytes": resident, "host_bytes": host, "host_reserved_bytes": reserved,
                "memo_reported_resident_bytes": reported, "steps": len(self.times), "step_times_s": self.times,
                "first_loss": self.first_loss}


def run_seq_len(names: list[str], seq_len: int, args) -> list[dict]:
    """All methods at one length. Timed steps are interleaved -- round r runs one step of every
    method, starting one method later each round -- so that a slow spell of a shared machine
    lands on all methods alike instead of on whichever ran during it."""
    runs = []
    for name in names:
        log(f"{name} seq {seq_len}: build + warm-up ...")
        runs.append(Run(Method(name), seq_len, args))
    for r in range(args.steps):
        for k in range(len(runs)):
            run = runs[(k + r) % len(runs)]
            run.timed_step()
            log(f"  {run.method.name} seq {seq_len}: step {r + 1}/{args.steps} {run.times[-1]:.2f} s")
    rows = []
    for run in runs:
        row = run.measure()
        log(f"  {row['method']} seq {seq_len}: median {row['step_s']:.3f} s/step, resident "
            f"{fmt_bytes(row['resident_bytes'])}, host {fmt_bytes(row['host_bytes'])}")
        rows.append(row)
    base = next(row["step_s"] for row in rows if row["method"] == "none")
    for row in rows:
        row["ratio"] = row["step_s"] / base
    return rows


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def print_table(results: list[dict], args) -> None:
    print(f"memo swap benchmark: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}; median of {args.steps} interleaved steps after 1 warm-up")
    # min s: the fastest step, less sensitive than the median to other processes on a shared machine.
    print(f"{'method':<22} {'seq':>6} {'step s':>8} {'ratio':>6} {'min s':>8} {'resident':>12} {'host':>12} "
          f"{'loss':>8}")
    for r in results:
        fastest = min(r["step_times_s"])
        print(f"{r['method']:<22} {r['seq_len']:>6} {r['step_s']:>8.3f} {r['ratio']:>6.2f} {fastest:>8.3f} "
              f"{fmt_bytes(r['resident_bytes']):>12} {fmt_bytes(r['host_bytes']):>12} {r['first_loss']:>8.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="heads = hidden // 64, kv heads = heads // 2")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median); at least 3")
    p.add_argument("--memo-ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of rows to run (default: all; memo rows need memo.wrap)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error(f"--steps {args.steps}: use at least 3 so the median means something")
    if args.threads:
        torch.set_num_threads(args.threads)

    names = list(BASELINES)
    if memo_available():
        names += [f"memo-{r:.1f}" for r in args.memo_ratios]
    else:
        log("memo.wrap is not available in this build: running the baselines only")
    if args.methods:
        unknown = set(args.methods) - set(names)
        if unknown:
            p.error(f"--methods: {sorted(unknown)} not among {names}")
        names = [n for n in names if n in args.methods]
    if "none" not in names:
        names.insert(0, "none")   # the baseline every ratio is against

    results = []
    for seq_len in args.seq_lens:
        results += run_seq_len(names, seq_len, args)
        gc.collect()

    print_table(results, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "batch": args.batch,
                "dtype": "float32", "steps": args.steps, "warmup_steps": 1, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.machine(), "memo_rows": memo_available(),
                "timing": "interleaved rounds, one step of each method per round"}
        with open(args.json, "w") as f:
            json.dump({"results": results, "meta": meta}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
