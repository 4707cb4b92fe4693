"""A short, real, deliberately troubled training run for the clinic's documentation screenshot.

A 12-layer Post-LN BERT trained from scratch (the paper's init) on SST-2 sentences (`../shared/data/glue/SST-2`,
tokenised with the MiniLM tokenizer), with LAMB at a large learning rate, no warmup, and a clip threshold far below
the gradient norms, watched by `ClinicCallback`. Expected findings: the amplification effect (→ Admin), large early
updates (→ RAdam or warmup) and clip saturation (→ raise the threshold). `--admin` adds `AdminCallback()` to show ω
and the amplification going away.

Usage:
    python tests/scripts/clinic_demo_run.py OUTPUT_DIR [--steps 40] [--admin]
    hf-clinic report OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, Trainer, TrainingArguments


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from tiny_models import minilm_checkpoint_path  # noqa: E402

import hf_clinic  # noqa: E402
from hf_clinic.admin import AdminCallback, paper_init  # noqa: E402
from hf_clinic.diagnostics import ClinicCallback  # noqa: E402


def sst2(n: int, tokenizer, seq_len: int) -> list[dict]:
    path = os.path.join(HERE, "..", "..", "..", "shared", "data", "glue", "SST-2", "train.tsv")
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    enc = tokenizer(
        [r[0] for r in rows], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(rows[i][1])}
        for i in range(len(rows))
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--admin", action="store_true", help="add AdminCallback()")
    ns = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=ns.hidden,
        num_hidden_layers=ns.layers,
        num_attention_heads=4,
        intermediate_size=4 * ns.hidden,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    paper_init(model)
    data = sst2(ns.batch_size * ns.steps, tokenizer, seq_len=40)
    args = TrainingArguments(
        output_dir=ns.output_dir,
        optim="lamb",
        learning_rate=ns.lr,
        lr_scheduler_type="linear",
        weight_decay=0.01,  # LAMB adapts only decayed layers (hf_clinic's adapt="decayed")
        max_grad_norm=ns.max_grad_norm,
        per_device_train_batch_size=ns.batch_size,
        max_steps=ns.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callbacks = ([AdminCallback()] if ns.admin else []) + [ClinicCallback(every=10)]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    trainer.save_state()
    print(
        f"hf_clinic {hf_clinic.__version__}: run written to {ns.output_dir}; now run `hf-clinic report {ns.output_dir}`"
    )


if __name__ == "__main__":
    main()
