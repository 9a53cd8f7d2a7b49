"""A training script for ``memo launch`` tests: ``python accel_launch_probe.py OUT_DIR [ARGS...]``.

Each process reads memo's settings with ``MemoPlugin()`` (from the MEMO_* variables memo launch
exported), starts ``Accelerator()`` (no cpu flag: the launch must make it MULTI_CPU), runs one
training step of a tiny Llama through ``memo.integrations.accelerate.prepare`` and writes what it saw
to OUT_DIR/<rank>.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: models

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

import memo  # noqa: E402
from memo.integrations.accelerate import MemoPlugin, prepare  # noqa: E402
from memo.wrap import runtime_of  # noqa: E402
from models import build  # noqa: E402


def main():
    out_dir, extra = sys.argv[1], sys.argv[2:]
    plugin = MemoPlugin()
    accelerator = Accelerator()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 32))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    model = build("llama", seed=1)
    model, optimizer, loader = prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       torch.utils.data.DataLoader(data, batch_size=2), plugin)
    batch = next(iter(loader))
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    inner = accelerator.unwrap_model(model)
    seen = {
        "rank": accelerator.process_index, "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "backend": accelerator.state.backend,
        "memo_env": {k: v for k, v in os.environ.items() if k.startswith("MEMO_")},
        "plugin": plugin.settings(), "argv": extra, "loss": loss.item(), "shard_len": batch["input_ids"].shape[1],
        "sp_ranks": runtime_of(inner).sp.ranks, "swapped_bytes": memo.stats(inner).swapped_bytes,
    }
    with open(os.path.join(out_dir, f"{accelerator.process_index}.json"), "w") as f:
        json.dump(seen, f)
    # Leave together: a rank exiting while gloo still serves its peer aborts ("terminate called without
    # an active exception", exit 134; seen once in a fresh-clone run).
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
