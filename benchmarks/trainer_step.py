"""Trainer steps/s on all-MiniLM-L6-v2 (sequence classification): `adamw_torch_fused` vs every hf-clinic name.

End-to-end: a real `transformers.Trainer` picks each optimizer by its `optim` name (`import hf_clinic` registered
ours), on the real MiniLM checkpoint, batch 32 × sequence 128 on CPU. A callback times every step (from one
`on_step_end` to the next) and the optimizer step alone (`on_pre_optimizer_step` → `on_optimizer_step`, i.e.
`optimizer.step()` including our telemetry bookkeeping), in wall-clock and in process CPU time. Telemetry is on and
logged every `--logging_steps` steps, as a user would run it.

Runs are interleaved: in each round every optimizer trains `--steps` steps (the first `--warmup` of each run are not
timed), the order rotating from round to round, so that load from other processes spreads over all of them. Reported
numbers are medians over all timed steps, and ratios to `adamw_torch_fused`.

Usage:
    python benchmarks/trainer_step.py                       # all names, 3 rounds x 6 steps
    python benchmarks/trainer_step.py --names lamb,radam --rounds 5 --json out.json
    python benchmarks/trainer_step.py --threads 1 ...       # on a loaded machine: compare CPU times
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import BertForSequenceClassification, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import hf_clinic


BASELINE = "adamw_torch_fused"


def minilm_path() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny_models import minilm_checkpoint_path

    return minilm_checkpoint_path()


class StepTimer(TrainerCallback):
    """Wall-clock and process CPU time of every step and of every `optimizer.step()`.

    CPU time (`time.process_time`, all threads of this process) is much less sensitive than wall time to other
    processes on a shared machine, especially with `--threads 1` (no OpenMP spin-waiting).
    """

    def __init__(self):
        self.step_ends: list[tuple[float, float]] = []
        self.optimizer_times: list[tuple[float, float]] = []
        self._pre = (0.0, 0.0)

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_ends.append(self._now())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pre = self._now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        now = self._now()
        self.optimizer_times.append((now[0] - self._pre[0], now[1] - self._pre[1]))

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(self._now())


def make_dataset(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def run_once(base, name, data, args_ns, out_dir) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=out_dir,
        optim=name,
        learning_rate=1.0 if name in ("lars", "larc") else 1e-4,
        weight_decay=0.01,
        per_device_train_batch_size=args_ns.batch_size,
        max_steps=args_ns.steps,
        logging_steps=args_ns.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=data, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table
    trainer.train()
    ends = timer.step_ends
    step_times = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:], strict=False)]
    return step_times[args_ns.warmup :], timer.optimizer_times[args_ns.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--names",
        default=",".join(hf_clinic.list_optimizers()),
        help="comma-separated hf-clinic names (the baseline adamw_torch_fused is always run)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per run, including --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--logging_steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write raw timings here")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")

    names = [BASELINE] + [n for n in args.names.split(",") if n]
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    data = make_dataset(args.batch_size * args.steps, args.seq_len, base.config.vocab_size)
    load_before = os.getloadavg()
    step_times = {n: [] for n in names}
    optimizer_times = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as out_dir:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                steps, opt = run_once(base, name, data, args, out_dir)
                step_times[name] += steps
                optimizer_times[name] += opt
                print(
                    f"round {r} {name:18s} step {statistics.median(t[0] for t in steps):.3f}s "
                    f"(cpu {statistics.median(t[1] for t in steps):.3f}s)  "
                    f"optimizer {statistics.median(t[0] for t in opt):.4f}s",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = os.getloadavg()

    def medians(times: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)

    base_step, base_step_cpu = medians(step_times[BASELINE])
    base_opt, base_opt_cpu = medians(optimizer_times[BASELINE])
    print(
        f"\nMiniLM-L6 (BertForSequenceClassification), batch {args.batch_size} x seq {args.seq_len}, CPU, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
        f"{args.rounds} rounds x {args.steps - args.warmup} timed steps per name.\n"
    )
    print(
        "| optim | step wall (median s) | steps/s | wall vs adamw_torch_fused | step CPU (median s) | "
        "CPU vs adamw_torch_fused | optimizer.step CPU (median ms) | optimizer.step CPU vs adamw_torch_fused |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        step, step_cpu = medians(step_times[name])
        opt, opt_cpu = medians(optimizer_times[name])
        print(
            f"| `{name}` | {step:.3f} | {1 / step:.3f} | {step / base_step:.3f} | {step_cpu:.3f} | "
            f"{step_cpu / base_step_cpu:.3f} | {1000 * opt_cpu:.1f} | {opt_cpu / base_opt_cpu:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "load_average": [load_before, load_after],
                    "step_times": step_times,
                    "optimizer_times": optimizer_times,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
