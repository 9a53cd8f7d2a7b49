"""The GPU recipes examples/accelerate/memo_8gpu.yaml and memo_2node.yaml say what memo plan chose.

Each recipe names, in a comment line, the ``memo plan`` command of its job; the test runs it
(greedy layouts, no MIP: a few seconds) and checks that the job fits and that the recipe's
processes, machines, sharding (ZeRO stage 3 -> FSDP2), sequence-parallel size and backend, swap
ratio, kept layers and host budget per GPU are the plan's; then ``memo launch --dry-run`` takes
the recipe as it is. The runs themselves need the GPUs.
"""

import json
import os
import shlex

import pytest
import yaml

from memo.cli.main import main
from memo.planner.units import parse_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["memo_8gpu.yaml", "memo_2node.yaml"]


def _plan_command(text: str) -> list[str]:
    lines = [line[2:] for line in text.splitlines() if line.startswith("# memo plan ")]
    assert len(lines) == 1, "a recipe names its memo plan command in one comment line"
    return shlex.split(lines[0])[1:]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_what_memo_plan_chose_and_fits(name, capsys):
    path = os.path.join(ROOT, "examples", "accelerate", name)
    text = open(path).read()
    recipe = yaml.safe_load(text)
    memo = recipe["memo"]
    capsys.readouterr()
    assert main([*_plan_command(text), "--no-mip", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"], plan["reasons"]
    assert recipe["num_processes"] == plan["gpus"]
    assert recipe["num_machines"] == -(-plan["gpus"] // plan["gpus_per_node"])
    assert plan["zero_stage"] == 3 and recipe["distributed_type"] == "FSDP"
    assert recipe["fsdp_config"]["fsdp_version"] == 2
    assert recipe["fsdp_config"]["fsdp_offload_params"] == plan["offload_params"]
    assert memo["sequence_parallel_size"] == plan["sp"] and memo["sp_backend"] == plan["sp_backend"]
    assert memo["swap_ratio"] == plan["alpha"] and memo["keep_last_layers"] == plan["keep_layers"]
    assert parse_bytes(memo["host_memory_budget"]) == plan["host_memory_bytes"] // min(plan["gpus"],
                                                                                       plan["gpus_per_node"])
    assert recipe["mixed_precision"] == plan["dtype"] == "bf16"
    assert main(["launch", "--config_file", path, "--dry-run", "--json", os.path.join(ROOT, "examples",
                                                                                     "train_long_context.py")]) == 0
