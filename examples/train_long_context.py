"""memo's main job: train a small Llama on long sequences where only the far context answers.

    python examples/train_long_context.py                 # 2 CPU processes, SP 2, swapping (memo launch)
    memo launch --config_file examples/accelerate/memo_cpu.yaml examples/train_long_context.py --max-steps 60
    python examples/train_long_context.py --resume runs/train_long_context/checkpoint

The task (synthetic, made on the fly): every sequence is random filler tokens with one value token
planted far back (``MARK v``, in the second quarter of the sequence) and asked for at the very end
(``QUERY`` -> ``v``). Only the answer is a label, so the loss can fall below ln(values) and the
retrieval accuracy above chance (1 / values) only if the model attends from the last token back
across the whole sequence, which under sequence parallelism lives on other ranks' shards.

The model is built from a config (no download). Training runs through Accelerate with
memo.integrations.accelerate.prepare: memo swaps activations token-wise to host memory and the
sequence is split over the processes (ring attention). Rank 0 shows a progress bar with loss,
accuracy, tokens/s and memory, and writes ``summary.json`` and ``training.png`` (loss, accuracy
and memory over the run) into ``--out``. ``--save-every`` writes a resumable checkpoint (weights,
optimizer, scheduler, RNG, data position) to ``--out/checkpoint``; ``--resume DIR`` continues from
one with the same losses as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VALUES, MARK, QUERY, FILLER0 = 16, 1, 2, 64   # value tokens are 8 .. 8+VALUES-1; filler from FILLER0 up


class RetrievalDataset(torch.utils.data.Dataset):
    """Sample i: filler, ``MARK v`` early, ``QUERY v`` at the end; labels only on the answer. Same per i."""

    def __init__(self, size: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.size, self.seq_len, self.vocab, self.seed = size, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(FILLER0, self.vocab, (self.seq_len,), generator=g)
        value = 8 + int(torch.randint(0, VALUES, (1,), generator=g))
        # In [S/4, S/2): under 2-rank zigzag sharding that is rank 1's first chunk, while the query
        # (the last chunk) is on rank 0, so the answer crosses the ring.
        at = int(torch.randint(self.seq_len // 4, self.seq_len // 2 - 1, (1,), generator=g))
        ids[at], ids[at + 1] = MARK, value
        ids[-2], ids[-1] = QUERY, value
        labels = torch.full((self.seq_len,), -100)
        labels[-1] = value          # predicted at position -2 (labels shift by one)
        return {"input_ids": ids, "labels": labels}


def _relaunch_distributed(args, argv: list[str]) -> int:
    """Run this script again as 2 processes through `memo launch` (the shipped CPU config)."""
    yaml = os.path.join(HERE, "accelerate", "memo_cpu.yaml")
    cmd = [sys.executable, "-m", "memo.cli.main", "launch", "--config_file", yaml, os.path.abspath(__file__), *argv]
    print(f"train_long_context: --sp {args.sp} needs {args.sp} processes; running: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


def _plot(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [h["loss"] for h in history])
    axes[0].axhline(math.log(VALUES), ls="--", c="grey", lw=1, label=f"chance ln {VALUES}")
    axes[0].set(title="loss (answer token)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [h["accuracy"] for h in history])
    axes[1].axhline(1 / VALUES, ls="--", c="grey", lw=1, label="chance")
    axes[1].set(title="retrieval accuracy", xlabel="step", ylim=(0, 1.02))
    axes[1].legend()
    mib = 2 ** 20
    axes[2].plot(steps, [h["resident_bytes"] / mib for h in history], label="device-resident activations")
    axes[2].plot(steps, [h["host_high_water_bytes"] / mib for h in history], label="host pool high water")
    axes[2].set(title="memory per rank (MiB)", xlabel="step")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sp", type=int, default=None,
                   help="sequence-parallel size (default: from the launcher's memo section, else 2 via memo launch)")
    p.add_argument("--swap-ratio", default=None, help="a float in [0, 1] or 'auto' (default: from the launcher)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step and data-parallel replica")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "train_long_context"))
    p.add_argument("--save-every", type=int, default=0, help="write --out/checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from a checkpoint written by this script")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps with a checkpoint, as an interrupted run would (for --resume)")
    args = p.parse_args(argv)
    if args.seq_len < 16:
        p.error("--seq-len must be at least 16")
    if "RANK" not in os.environ and (args.sp or 2) > 1:
        if args.sp not in (None, 2):
            p.error(f"--sp {args.sp}: launch {args.sp} processes yourself, e.g. memo launch --config_file "
                    f"CONFIG.yaml with num_processes and memo.sequence_parallel_size {args.sp}")
        args.sp = 2
        return _relaunch_distributed(args, argv)
    return train(args)


def train(args) -> int:
    from accelerate import Accelerator
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import memo
    from memo.integrations.accelerate import MemoPlugin, prepare, skip_first_batches
    from memo.integrations.checkpoint import load_checkpoint, save_checkpoint
    from memo.planner.units import format_bytes
    from memo.wrap import runtime_of

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    plugin = MemoPlugin(sequence_parallel_size=args.sp, swap_ratio=args.swap_ratio)
    sp = plugin.sequence_parallel_size or 1
    replicas = world // sp if world % sp == 0 else 0
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq_len, 2048), use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Linear warm-up, then constant: retrieval is learnt in one jump after a plateau (~100 steps
    # here), which a decaying rate would delay.
    warmup = max(1, args.max_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    data = RetrievalDataset(args.max_steps * args.batch_size * max(replicas, 1), args.seq_len, args.vocab, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    model, optimizer, loader = prepare(accelerator, model, optimizer, loader, plugin)
    plain = accelerator.unwrap_model(model)

    start_step, history = 0, []
    if args.resume:
        state = load_checkpoint(args.resume, model=plain, optimizer=optimizer, scheduler=scheduler)
        start_step, history = state["step"], list(state["data_state"]["history"])
        loader = skip_first_batches(accelerator, loader, start_step)

    # Retrieval accuracy from the training forward itself: the decoder stack's output at the query
    # position (global position seq_len - 2, on whichever rank holds it) through the LM head.
    captured = {}
    hook = plain.model.register_forward_hook(lambda mod, inp, out: captured.__setitem__("hidden", out[0]))

    os.makedirs(args.out, exist_ok=True)
    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True)
    if rank == 0:
        print(f"train_long_context: {world} process(es) = {replicas} data-parallel x {sp} sequence-parallel; "
              f"{args.seq_len} tokens per sequence ({args.seq_len // sp} per rank), batch {args.batch_size}, "
              f"swap ratio {runtime_of(plain).config.swap_ratio}", file=sys.stderr)
    step = start_step
    stop = args.max_steps if args.stop_after is None else min(args.stop_after, args.max_steps)
    for batch in loader:
        if step >= stop:
            break
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            query = batch["position_ids"].expand_as(batch["input_ids"]) == args.seq_len - 2
            hidden = captured.pop("hidden")[query]
            target = batch["shift_labels"][query]
            right = (plain.lm_head(hidden).argmax(-1) == target).sum() if len(target) else torch.zeros((), dtype=torch.long)
            counts = accelerator.reduce(torch.stack([right.long(), torch.tensor(len(target))]), reduction="sum")
        elapsed = time.perf_counter() - t0
        step += 1
        st = memo.stats(plain)
        row = {"step": step, "loss": out.loss.item(), "accuracy": counts[0].item() / max(counts[1].item(), 1),
               "step_s": elapsed, "tokens_per_s": args.batch_size * max(replicas, 1) * args.seq_len / elapsed,
               "resident_bytes": st.resident_bytes, "swapped_bytes": st.swapped_bytes,
               "host_high_water_bytes": st.host_pool["high_water_bytes"],
               "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        resident=format_bytes(row["resident_bytes"]), host=format_bytes(row["host_high_water_bytes"]))
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_checkpoint(os.path.join(args.out, "checkpoint"), model=plain, optimizer=optimizer,
                            scheduler=scheduler, step=step, data_state={"history": history})
    bar.close()
    hook.remove()
    save_checkpoint(os.path.join(args.out, "checkpoint"), model=plain, optimizer=optimizer, scheduler=scheduler,
                    step=step, data_state={"history": history})
    if rank == 0:
        last = history[-10:]
        summary = {"args": vars(args), "world": world, "sequence_parallel": sp, "data_parallel": replicas,
                   "steps": step, "final_loss": sum(h["loss"] for h in last) / len(last),
                   "final_accuracy": sum(h["accuracy"] for h in last) / len(last),
                   "chance_loss": math.log(VALUES), "chance_accuracy": 1 / VALUES,
                   "memo": memo.stats(plain).to_dict(), "history": history}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _plot(history, os.path.join(args.out, "training.png"))
        print(f"train_long_context: final loss {summary['final_loss']:.3f} (chance {math.log(VALUES):.3f}), "
              f"retrieval accuracy {summary['final_accuracy']:.2f} (chance {1 / VALUES:.2f}), last 10 steps")
        print(f"train_long_context: wrote {os.path.join(args.out, 'summary.json')}, "
              f"{os.path.join(args.out, 'training.png')} and the checkpoint {os.path.join(args.out, 'checkpoint')}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
