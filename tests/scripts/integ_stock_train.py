"""A stock-style training script, in the shape of transformers' `run_glue.py`: `HfArgumentParser` + `Trainer`.

It never imports hf_clinic. `tests/test_launch.py` runs it with and without `python -m hf_clinic.launch` to show
that the launcher alone makes `--optim radam` / `--optim lamb` valid. It writes one JSON result per process.
"""

from __future__ import annotations  # string annotations: HfArgumentParser must resolve them in this module

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    result_dir: str = field(metadata={"help": "Folder for one result JSON per process."})
    num_samples: int = field(default=32, metadata={"help": "Size of the random training set."})


def main():
    # Recorded before anything else: was hf_clinic imported by whoever started this script?
    imported_before = "hf_clinic" in sys.modules
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    dataset = [
        {"input_ids": torch.randint(2, 128, (12,), generator=g), "labels": int(torch.randint(0, 2, (), generator=g))}
        for _ in range(script_args.num_samples)
    ]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()

    inner = trainer.optimizer.optimizer  # AcceleratedOptimizer does not forward attributes
    result = {
        "hf_clinic_imported_before_script": imported_before,
        "optim": training_args.optim.value,
        "optimizer_class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "world_size": training_args.world_size,
        "process_index": training_args.process_index,
        "global_step": trainer.state.global_step,
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
    }
    os.makedirs(script_args.result_dir, exist_ok=True)
    with open(os.path.join(script_args.result_dir, f"rank{training_args.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
