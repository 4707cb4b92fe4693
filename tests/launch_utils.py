"""Starting real multi-process runs from tests: `accelerate launch` with 2 CPU processes over gloo."""

import os
import socket
import subprocess
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script_and_args: list[str], num_processes: int = 2, timeout: int = 300, env=None, cwd=None):
    """Run `accelerate launch --multi_gpu --num_processes N` on CPU (gloo) and return the CompletedProcess.

    `--multi_gpu` with `ACCELERATE_USE_CPU=1` is what starts N real CPU processes; `--cpu --num_processes 2` starts one.
    The launcher is invoked as `python -m accelerate.commands.launch`, which works even where the `accelerate`
    console script cannot import (e.g. timm installed without torchvision).
    """
    full_env = dict(os.environ)
    full_env.update(
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, full_env.get("PYTHONPATH")])),
    )
    full_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *script_and_args,
    ]
    result = subprocess.run(cmd, env=full_env, cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"accelerate launch failed ({result.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result
