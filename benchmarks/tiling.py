"""One training step's activation peak and time with and without token tiling of the MLP.

Trains one small Llama whose MLP is 8x its hidden size (built from a config, fixed seeds,
synthetic token ids), wrapped by memo at swap ratio 0 with no kept layers, under:

    untiled     MemoConfig(tile_tokens=None)
    tile-T      MemoConfig(tile_tokens=T) for T in --tiles
    auto        MemoConfig(tile_tokens="auto") (NOTE [ Token tiling ] rule 6 in memo/tiling.py)

For each row: one warm-up step, the median of ``--steps`` timed steps (forward, backward; the
rows interleaved so that machine noise spreads over all of them), then one untimed step whose
peak is measured by memo.memtrack (independent of memo's own counters: the largest total of
storages created during the step that are alive at once, NOTE [ What memtrack counts ] rule 8).
Parameter gradients exist before the measured step, so the peak is activations and transients.
Ratios are against ``untiled`` in the same run. With ``--plan``, the planner's predicted peak for
the same model, length and options (``memo plan --json``) is shown beside the measured one.

    python benchmarks/tiling.py [--seq-len 8192] [--hidden 256] [--layers 2] [--tiles 1024]
                                [--steps 3] [--plan] [--json PATH]

The defaults take about two minutes on 2 CPU cores. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import os
import sys

# Run as `python benchmarks/tiling.py`, this directory is sys.path[0], and benchmarks/copy.py there
# would shadow the standard library's `copy` module (which torch imports). Drop it first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import memo  # noqa: E402
from memo.memtrack import track_storages  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_config(args) -> LlamaConfig:
    heads = max(1, args.hidden // 64)
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=8 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), max_position_embeddings=args.seq_len,
                       use_cache=False, attn_implementation="sdpa")


def build(args, tile) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args)).train()
    memo.wrap(model, memo.MemoConfig(swap_ratio=0.0, keep_last_layers=0, tile_tokens=tile,
                                     host_memory_budget="8GiB"))
    return model


def step(model, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return time.perf_counter() - start


def measure_peak(model, ids) -> int:
    model.zero_grad(set_to_none=False)   # gradients exist: the step adds into them in place
    gc.collect()
    with track_storages() as tracker:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
    return tracker.peak_bytes


def planned_peak(args, tile) -> dict:
    """The planner's predicted activation peak for this job (memo plan --json)."""
    import contextlib
    import io

    from memo.cli.main import main as cli
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        model_config(args).to_json_file(path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["plan", "--model", path, "--seq-len", str(args.seq_len), "--gpus", "1", "--sp", "1",
                        "--dtype", "fp32", "--host-memory", "64GiB", "--swap-ratio", "0", "--keep-layers", "0",
                        "--tile-tokens", "none" if tile is None else str(tile), "--no-mip", "--json"])
        if code != 0:
            raise SystemExit(f"memo plan exited {code}")
        plan = json.loads(out.getvalue())
    return {"predicted_activation_peak_bytes": plan["predicted"]["activation_live_peak_bytes"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--tiles", type=int, nargs="*", default=[1024])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", action="store_true", help="compare with memo plan's predicted peak")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    rows = [("untiled", None)] + [(f"tile-{t}", t) for t in args.tiles] + [("auto", "auto")]
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    models = {}
    for name, tile in rows:
        log(f"[tiling] {name}: build and warm up")
        models[name] = build(args, tile)
        step(models[name], ids)
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for i in range(args.steps):
        for name, _ in rows:
            times[name].append(step(models[name], ids))
            log(f"[tiling] step {i + 1}/{args.steps} {name}: {times[name][-1]:.2f} s")
    results = []
    for name, tile in rows:
        peak = measure_peak(models[name], ids)
        st = memo.stats(models[name])
        row = {"row": name, "tile_setting": tile, "tile_tokens": st.layers[0].tile_tokens,
               "step_s": statistics.median(times[name]), "steps": args.steps, "peak_bytes": peak}
        if args.plan:
            row.update(planned_peak(args, st.layers[0].tile_tokens))
        results.append(row)
        log(f"[tiling] {name}: peak {peak / 2**20:.1f} MiB")
    base = results[0]
    for row in results:
        row["peak_vs_untiled"] = row["peak_bytes"] / base["peak_bytes"]
        row["time_vs_untiled"] = row["step_s"] / base["step_s"]
        if "predicted_activation_peak_bytes" in row:
            row["predicted_vs_measured"] = row["predicted_activation_peak_bytes"] / row["peak_bytes"]
    what = (f"Llama hidden {args.hidden}, MLP {8 * args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, "
            f"{args.seq_len} tokens, batch 1, swap ratio 0, no kept layers; {torch.get_num_threads()} threads on "
            f"{platform.processor() or platform.machine()}")
    print(what)
    head = f"{'row':<12} {'tile':>6} {'step s':>8} {'x untiled':>9} {'peak MiB':>9} {'x untiled':>9}"
    if args.plan:
        head += f" {'planned MiB':>11} {'planned/meas':>12}"
    print(head)
    for r in results:
        line = (f"{r['row']:<12} {r['tile_tokens'] or '-':>6} {r['step_s']:>8.2f} {r['time_vs_untiled']:>9.2f} "
                f"{r['peak_bytes'] / 2**20:>9.1f} {r['peak_vs_untiled']:>9.2f}")
        if args.plan:
            line += f" {r['predicted_activation_peak_bytes'] / 2**20:>11.1f} {r['predicted_vs_measured']:>12.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": what, "args": vars(args), "rows": results}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
