"""Overhead of `ClinicCallback` at its default cadence, as a fraction of the Trainer step time on MiniLM.

Setting: the real all-MiniLM-L6-v2 checkpoint (`BertForSequenceClassification`), batch 32 x sequence 128, CPU,
`adamw_torch`, logging every step (the most expensive logging a user would choose).

Two measurements:

1. **Component costs** (robust to load from other processes). One run with the clinic probing at every step
   (`every=1, update_ratio_every=1`) times each activity inside the callback (`callback.timings`): one probe
   (amplification + residual dependency: two eval-mode forwards of the 8-example probe batch), one update-ratio
   measurement (copy of every trainable matrix before the step, norm of the difference after), one log record. With
   the baseline step time t (median of a run without the clinic), the overhead at the default cadence (a probe every
   100 steps, an update ratio every 10 steps, a log every `logging_steps`) is

       overhead = (c_probe / 100 + c_ratio / 10 + c_log / logging_steps) / t          (steady state)

   plus, once per run, the early phase (update ratios at each of the first 10 steps, a probe before step 1 and at the
   end), reported separately amortised over a 1,000-step run.
2. **Direct A/B**: runs without and with `ClinicCallback()` (defaults), interleaved in rounds so that load from other
   processes spreads over both; median step time of each arm (first `--warmup` steps of each run not timed). On a
   short run this includes the early phase, so it is an upper bound of the steady state; on a loaded machine it is
   noisy, which is why (1) is the headline number.

Usage:
    python benchmarks/clinic_overhead.py                      # ~10 min on 2 busy cores
    python benchmarks/clinic_overhead.py --rounds 3 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
import transformers
from transformers import BertForSequenceClassification, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import hf_clinic  # noqa: F401
from hf_clinic.diagnostics import ClinicCallback


def minilm_path() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_models import minilm_checkpoint_path

    return minilm_checkpoint_path()


class StepTimer(TrainerCallback):
    """Wall time from one `on_step_end` to the next (the whole step, callbacks included)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def steps(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][warmup:]


def make_dataset(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = torch.ones(seq_len, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def run(path, data, ns, clinic: ClinicCallback | None, out_dir: str) -> tuple[list[float], ClinicCallback | None]:
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=out_dir,
        optim="adamw_torch",
        learning_rate=5e-5,
        per_device_train_batch_size=ns.batch_size,
        max_steps=ns.steps,
        logging_steps=ns.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    callbacks = [timer] + ([clinic] if clinic is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return timer.steps(ns.warmup), clinic


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds (default 2)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per A/B run (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run (default 2)")
    parser.add_argument("--component-steps", type=int, default=6, help="steps of the probe-every-step run (default 6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="write the results here")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    path = minilm_path()
    vocab = BertForSequenceClassification.config_class.from_pretrained(path).vocab_size
    data = make_dataset(ns.batch_size * max(ns.steps, ns.component_steps), ns.seq_len, vocab)
    tmp = tempfile.mkdtemp(prefix="clinic_overhead_")

    baseline, clinic_steps = [], []
    for r in range(ns.rounds):
        arms = [("baseline", None), ("clinic", "default")]
        for name, kind in arms if r % 2 == 0 else arms[::-1]:
            steps, _ = run(path, data, ns, ClinicCallback() if kind else None, os.path.join(tmp, f"{name}{r}"))
            (baseline if kind is None else clinic_steps).extend(steps)
            print(
                f"round {r} {name:8s}: median step {statistics.median(steps):.3f} s over {len(steps)} steps",
                flush=True,
            )

    # Component costs: probe and update ratios at every step.
    comp = argparse.Namespace(**{**vars(ns), "steps": ns.component_steps})
    clinic = ClinicCallback(every=1, update_ratio_every=1)
    comp_steps, clinic = run(path, data, comp, clinic, os.path.join(tmp, "components"))
    with open(os.path.join(tmp, "components", "clinic_log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    n_probe = sum(r["type"] == "diagnostics" for r in recs)
    n_ratio = sum(r["type"] == "update_ratio" for r in recs)
    n_log = sum(r["type"] == "log" for r in recs)
    c_probe = clinic.timings["probe"] / n_probe
    c_ratio = clinic.timings["update_ratio"] / n_ratio
    c_log = clinic.timings["logs"] / max(n_log, 1)

    t_step = statistics.median(baseline)
    steady = (c_probe / 100 + c_ratio / 10 + c_log / ns.logging_steps) / t_step
    # Early phase, once per run: 10 extra update ratios (steps 1-10 all measured, instead of 1), the probe before
    # step 1 and the one at the end.
    early = (9 * c_ratio + 2 * c_probe) / t_step
    run_1000 = steady + early / 1000
    ab = statistics.median(clinic_steps) / t_step - 1

    result = {
        "setting": {
            "model": "all-MiniLM-L6-v2 (BertForSequenceClassification)",
            "batch_size": ns.batch_size,
            "seq_len": ns.seq_len,
            "logging_steps": ns.logging_steps,
            "threads": ns.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(),
        },
        "baseline_step_s": t_step,
        "clinic_default_step_s": statistics.median(clinic_steps),
        "probe_s": c_probe,
        "update_ratio_s": c_ratio,
        "log_s": c_log,
        "overhead_steady": steady,
        "overhead_1000_steps": run_1000,
        "overhead_ab_short_run": ab,
        "timed_steps": {"baseline": len(baseline), "clinic": len(clinic_steps)},
    }
    print()
    print(f"baseline step (median of {len(baseline)}): {t_step:.3f} s")
    print(f"probe (amplification + dependency, 8 examples): {c_probe * 1000:.0f} ms  [{n_probe} measured]")
    print(f"update-ratio measurement: {c_ratio * 1000:.1f} ms  [{n_ratio} measured]")
    print(f"log record: {c_log * 1000:.2f} ms  [{n_log} measured]")
    print(f"overhead at the default cadence, steady state: {100 * steady:.2f} % of a step")
    print(f"overhead at the default cadence, 1000-step run incl. early phase: {100 * run_1000:.2f} %")
    print(f"direct A/B, {ns.steps}-step runs incl. early phase (noisy under load): {100 * ab:+.2f} %")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
