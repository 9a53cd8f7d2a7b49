"""memo's main job: train a small Llama on long sequences where only the far context answers.

    python examples/train_long_context.py                 # 2 CPU processes, SP 2, swapping (memo launch)
    memo launch --config_file examples/accelerate/memo_cpu.yaml examples/train_long_context.py --max-steps 60
    python examples/train_long_context.py --resume runs/train_long_context/checkpoint
    python examples/train_long_context.py --model PATH_OR_ID --data corpus.jsonl book.txt --seq-len 4096

The task (synthetic, made on the fly): every sequence is random filler tokens with one value token
planted far back (``MARK v``, in the second quarter of the sequence) and asked for at the very end
(``QUERY`` -> ``v``). Only the answer is a label, so the loss can fall below ln(values) and the
retrieval accuracy above chance (1 / values) only if the model attends from the last token back
across the whole sequence, which under sequence parallelism lives on other ranks' shards.

By default the model is built from a config and the data is made on the fly (no download).
``--model PATH_OR_ID`` loads a pretrained causal LM and its tokenizer (``AutoModelForCausalLM``,
``AutoTokenizer``; ``--dtype bf16|fp32``); ``--data FILE...`` trains it on real text instead, jsonl
files with a "text" field or .txt files, tokenized and packed into ``--seq-len`` sequences (each
document ends in EOS, ``position_ids`` restart at 0 at every document: examples/long_context_data.py),
repeated as often as the steps need. Training runs through Accelerate with
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
    retrieval = history[0]["accuracy"] is not None
    axes[0].plot(steps, [h["loss"] for h in history])
    if retrieval:
        axes[0].axhline(math.log(VALUES), ls="--", c="grey", lw=1, label=f"chance ln {VALUES}")
        axes[0].legend()
    axes[0].set(title="loss (answer token)" if retrieval else "loss (next token)", xlabel="step")
    if retrieval:
        axes[1].plot(steps, [h["accuracy"] for h in history])
        axes[1].axhline(1 / VALUES, ls="--", c="grey", lw=1, label="chance")
        axes[1].set(title="retrieval accuracy", xlabel="step", ylim=(0, 1.02))
        axes[1].legend()
    else:
        axes[1].axis("off")
    mib = 2 ** 20
    axes[2].plot(steps, [h["resident_bytes"] / mib for h in history], label="device-resident activations")
    axes[2].plot(steps, [h["host_high_water_bytes"] / mib for h in history], label="host pool high water")
    axes[2].set(title="memory per rank (MiB)", xlabel="step")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _retrieval_accuracy(accelerator, plain, batch, captured: dict, seq_len: int) -> float:
    """Answers right at the query position over all ranks: the decoder stack's output there (global
    position seq_len - 2, on whichever rank holds it) through the LM head."""
    with torch.no_grad():
        query = batch["position_ids"].expand_as(batch["input_ids"]) == seq_len - 2
        hidden = captured.pop("hidden")[query]
        target = batch["shift_labels"][query]
        right = (plain.lm_head(hidden).argmax(-1) == target).sum() if len(target) else torch.zeros((), dtype=torch.long)
        counts = accelerator.reduce(torch.stack([right.long(), torch.tensor(len(target))]), reduction="sum")
    return counts[0].item() / max(counts[1].item(), 1)


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
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="a pretrained causal LM (directory or hub id) with its tokenizer, instead of a small Llama "
                        "built from --layers/--hidden/--vocab")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the --model's dtype (fp32)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="train on these .jsonl ({\"text\": ...} per line) or .txt files, packed into --seq-len "
                        "sequences, instead of the synthetic retrieval task (needs --model for its tokenizer)")
    p.add_argument("--out", default=os.path.join("runs", "train_long_context"))
    p.add_argument("--save-every", type=int, default=0, help="write --out/checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from a checkpoint written by this script")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps with a checkpoint, as an interrupted run would (for --resume)")
    args = p.parse_args(argv)
    if args.seq_len < 16:
        p.error("--seq-len must be at least 16")
    if args.data is not None:
        from long_context_data import DataError, read_documents
        if args.model is None:
            p.error("--data needs --model: the text is tokenized with the model's tokenizer")
        try:   # before any process starts: a bad file is named once, with its line
            read_documents(args.data)
        except DataError as e:
            p.error(f"--data: {e}")
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

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
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], attn_implementation="sdpa")
        model.config.use_cache = False
    else:
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab,
                             max_position_embeddings=max(args.seq_len, 2048), use_cache=False,
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(config)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Linear warm-up, then constant: retrieval is learnt in one jump after a plateau (~100 steps
    # here), which a decaying rate would delay.
    warmup = max(1, args.max_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    samples = args.max_steps * args.batch_size * max(replicas, 1)
    if args.data is not None:
        from long_context_data import PackedText, read_documents
        data = PackedText(AutoTokenizer.from_pretrained(args.model), read_documents(args.data), args.seq_len,
                          length=samples)
    else:
        data = RetrievalDataset(samples, args.seq_len, vocab, args.seed)
    retrieval = args.data is None
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
    hook = plain.model.register_forward_hook(lambda mod, inp, out: captured.__setitem__("hidden", out[0])) \
        if retrieval else None

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
        accuracy = _retrieval_accuracy(accelerator, plain, batch, captured, args.seq_len) if retrieval else None
        elapsed = time.perf_counter() - t0
        step += 1
        st = memo.stats(plain)
        row = {"step": step, "loss": out.loss.item(), "accuracy": accuracy,
               "step_s": elapsed, "tokens_per_s": args.batch_size * max(replicas, 1) * args.seq_len / elapsed,
               "resident_bytes": st.resident_bytes, "swapped_bytes": st.swapped_bytes,
               "host_high_water_bytes": st.host_pool["high_water_bytes"],
               "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        history.append(row)
        shown = {"acc": f"{accuracy:.2f}"} if retrieval else {}
        bar.set_postfix(loss=f"{row['loss']:.3f}", **shown, tok_s=f"{row['tokens_per_s']:.0f}",
                        resident=format_bytes(row["resident_bytes"]), host=format_bytes(row["host_high_water_bytes"]))
        bar.update(1)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_checkpoint(os.path.join(args.out, "checkpoint"), model=plain, optimizer=optimizer,
                            scheduler=scheduler, step=step, data_state={"history": history})
    bar.close()
    if hook is not None:
        hook.remove()
    save_checkpoint(os.path.join(args.out, "checkpoint"), model=plain, optimizer=optimizer, scheduler=scheduler,
                    step=step, data_state={"history": history})
    if rank == 0:
        last = history[-10:]
        summary = {"args": vars(args), "world": world, "sequence_parallel": sp, "data_parallel": replicas,
                   "steps": step, "final_loss": sum(h["loss"] for h in last) / len(last),
                   "final_accuracy": sum(h["accuracy"] for h in last) / len(last) if retrieval else None,
                   # Text: the loss of a uniform guess over the vocabulary.
                   "chance_loss": math.log(VALUES) if retrieval else math.log(vocab),
                   "chance_accuracy": 1 / VALUES if retrieval else None,
                   "memo": memo.stats(plain).to_dict(), "history": history}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _plot(history, os.path.join(args.out, "training.png"))
        accuracy = (f", retrieval accuracy {summary['final_accuracy']:.2f} (chance {1 / VALUES:.2f})"
                    if retrieval else "")
        print(f"train_long_context: final loss {summary['final_loss']:.3f} (chance {summary['chance_loss']:.3f})"
              f"{accuracy}, last 10 steps")
        print(f"train_long_context: wrote {os.path.join(args.out, 'summary.json')}, "
              f"{os.path.join(args.out, 'training.png')} and the checkpoint {os.path.join(args.out, 'checkpoint')}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
