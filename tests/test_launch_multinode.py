"""Two machines through `memo launch` (issue 15 item 5), played on this one over the loopback address.

Two `memo launch` invocations of one config, machine_rank 0 and 1, 2 processes each, form one
4-process job whose 4 ranks share each sequence (SP 4 across both "machines"): every rank sees
world 4, the group [0, 1, 2, 3], a quarter of the sequence, and the whole sequence's loss, which is
the loss one process computes on the same batch. (memo launch hands a multi-machine MULTI_CPU job to
torch.distributed.run through Accelerate's --multi_gpu launcher: NOTE [ Multi-CPU on one machine ].)
"""

import json
import os
import socket
import subprocess
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "sp_workers", "accel_launch_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_memo_launches_form_one_sequence_parallel_job_equal_to_one_process(tmp_path):
    port = _free_port()
    out = tmp_path / "seen"
    out.mkdir()
    procs = []
    for machine in (0, 1):
        config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU", "num_processes": 4,
                  "num_machines": 2, "machine_rank": machine, "main_process_ip": "127.0.0.1",
                  "main_process_port": port, "rdzv_backend": "static", "same_network": True, "use_cpu": True,
                  "mixed_precision": "no",
                  "memo": {"sequence_parallel_size": 4, "swap_ratio": 0.5, "keep_last_layers": 1,
                           "host_memory_budget": "1GiB"}}
        path = tmp_path / f"machine{machine}.yaml"
        path.write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "memo.cli.main", "launch", "--config_file", str(path),
                                       PROBE, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=ROOT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("the two launches did not finish in 240 s:\n" + "\n".join(
                q.communicate()[0][-3000:] for q in procs))
    # torch.distributed.run's agents meet in an exit barrier after the job; on a loaded machine one agent
    # can find the other's store already closed ("Error waiting on exit barrier") and abort after every
    # rank finished. That teardown race is torch elastic's, not the job's: accepted only when every rank
    # wrote its result; any other non-zero exit fails.
    for p, log in zip(procs, logs):
        done = all((out / f"{rank}.json").exists() for rank in range(4))
        assert p.returncode == 0 or (done and "Error waiting on exit barrier" in log), log[-3000:]
    seen = [json.load(open(out / f"{rank}.json")) for rank in range(4)]
    for rank, s in enumerate(seen):
        assert s["rank"] == rank and s["world"] == 4 and s["sp_ranks"] == [0, 1, 2, 3], s
        assert s["shard_len"] == 8 and s["swapped_bytes"] > 0, s   # 32 tokens over 4 ranks
    # One process, no memo, on the probe's first batch (its data: seed 0, ids[0:2]; its model: seed 1).
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from models import build
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 32))[:2]
    plain = build("llama", seed=1)
    loss32 = plain(input_ids=ids, labels=ids).loss.item()
    logits = plain.double()(input_ids=ids).logits   # the loss in fp64 too (transformers' own casts to fp32)
    loss64 = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    for s in seen:
        assert abs(s["loss"] - loss64) <= 2 * max(abs(loss32 - loss64), 4.8e-7), (s["loss"], loss32, loss64)
