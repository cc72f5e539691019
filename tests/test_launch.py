"""Launches whose processes do not form one process group are refused (real `accelerate launch` runs on the CPU).

The command the refusal names is the one test_recipes.py's two-process runs use, so it is known to form a group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

SCRIPT = """\
import sys
from torch import nn
from hyperlora import HyperLoraConfig
from hyperlora.trainer import ContinualTrainer, ContinualTrainingArguments

model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
args = ContinualTrainingArguments(output_dir=sys.argv[1])
trainer = ContinualTrainer(model, HyperLoraConfig(r=2, hypernet_hidden_dim=8, target_modules=["1"]), args)
print("processes", trainer.accelerator.num_processes, flush=True)
"""

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without GPUs does")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path, options: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), str(script), str(tmp_path / "run")]
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("options", [["--multi_gpu"], ["--cpu"]])
def test_processes_that_formed_no_group_are_refused_with_the_command_to_run(tmp_path, options):
    result = _launch(tmp_path, options)
    assert result.returncode != 0
    assert "processes 1" not in result.stdout  # no process went on alone
    assert "did not form a process group" in result.stderr
    assert "Run instead: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ..." in result.stderr
    assert not (tmp_path / "run").exists()
