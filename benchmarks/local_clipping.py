"""Clipping benchmarks (issue 5): CELGC communication savings, and the per-step cost of ClipAwareCallback.

Part `local` — 2 processes on CPU (`accelerate launch --multi_gpu --num_processes 2`, gloo) train a small GPT-2-style
byte-level language model on the English side of Multi30k (`../shared/data/multi30k`) with SGD at a constant lr,
for the same number of optimizer steps in every configuration:

* `ddp`: plain DDP (gradients all-reduced every step) with *global* clipping at gamma / eta;
* `celgc-I1`, `celgc-I4`, `celgc-I16`: `LocalGradientClipping` (local clipping at gamma / eta, replicas averaged
  every I optimizer steps).

Each process samples its own batches. Every 64 steps (a multiple of every I, so every replica has just been
averaged) both processes evaluate the same held-out batches; rank 0 reports. Communication is counted by the
benchmark itself, with a wrapper around `torch.distributed.all_reduce`; DDP runs its standard all-reduce as a Python
communication hook (`default_hooks.allreduce_hook`, one `all_reduce` per gradient bucket) so the wrapper sees it.
Bytes are the payload handed to all-reduce per process. Wall time is the training loop only (evaluation excluded),
on rank 0.

Part `overhead` — one process, `transformers.Trainer` on a small BERT classifier: the per-step time of the Trainer's
built-in clipping (`max_grad_norm=1.0`) against `ClipAwareCallback()` (the same clipping, through the schedule),
`ClipAwareCallback("zscore")` and `ClipAwareCallback("percentile")`, interleaved in rounds; per-step time between
`on_step_begin` and `on_step_end`, median per (variant, round), and the overhead as the median over rounds of the
ratio to the built-in run of the same round. It also times the clip call alone (Accelerate's `clip_grad_norm_` vs the
schedule's interception, clipping and not clipping) on the same gradients, which whole-step noise on a shared
machine cannot hide.

Usage:
    nice -n 10 python benchmarks/local_clipping.py [--part local|overhead|all] [--steps 448] [--out DIR]
`--configs ddp,celgc-I4` re-runs a subset and reuses the other configurations' saved runs.
Writes `local_clipping.json`, `loss_vs_rounds.png`, `clip_overhead.json` and `summary.md` under
`benchmarks/results/local_clipping/`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k" / "task1" / "raw"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "local_clipping"
CONFIGS = {"ddp": 1, "celgc-I1": 1, "celgc-I4": 4, "celgc-I16": 16}
SEQ, BATCH, EVAL_EVERY, EVAL_BATCHES = 64, 16, 64, 4
LR, GAMMA = 0.5, 0.75  # clip threshold gamma / lr = 1.5 on the gradient norm (clips about half the steps)


# ---- part `local`: the worker (runs under accelerate launch) ------------------------------------------------------


def load_bytes(split: str):
    import torch

    with gzip.open(DATA / f"{split}.en.gz", "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()


def make_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256,
        n_positions=SEQ,
        n_embd=128,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=10,
        eos_token_id=10,
    )
    return GPT2LMHeadModel(config)


def worker(config: str, steps: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    counts = {"calls": 0, "bytes": 0}
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counts["calls"] += 1
        counts["bytes"] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce

    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from hf_clinic import LocalGradientClipping

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    train_data, val_data = load_bytes("train"), load_bytes("val")
    g = torch.Generator().manual_seed(1234 + rank)
    starts = torch.arange(EVAL_BATCHES * BATCH) * ((len(val_data) - SEQ - 1) // (EVAL_BATCHES * BATCH))
    val = torch.stack([val_data[s : s + SEQ] for s in starts.tolist()])

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config == "ddp":
        # The standard all-reduce, as a Python hook: it calls dist.all_reduce per bucket, so the wrapper counts it.
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    celgc = LocalGradientClipping(
        accelerator, model, optimizer, gamma=GAMMA, local_steps=CONFIGS[config], enabled=config != "ddp"
    )

    def evaluate():
        model.eval()
        with torch.no_grad():
            losses = [float(model(input_ids=b, labels=b).loss) for b in val.split(BATCH)]
        model.train()
        return sum(losses) / len(losses)

    curve = [{"step": 0, "rounds": 0, "eval_loss": evaluate()}]
    train_losses, clipped, train_time = [], 0, 0.0
    with celgc:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(train_data) - SEQ - 1, (BATCH,), generator=g)
            batch = torch.stack([train_data[i : i + SEQ] for i in idx.tolist()])
            t0 = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            if config == "ddp":
                norm = accelerator.clip_grad_norm_(model.parameters(), GAMMA / LR)  # global norm (all-reduced)
                clipped += int(float(norm) > GAMMA / LR)
            optimizer.step()
            optimizer.zero_grad()
            celgc.step()
            train_time += time.perf_counter() - t0
            train_losses.append(float(loss))
            if step % EVAL_EVERY == 0:
                rounds = step if config == "ddp" else celgc.num_rounds
                curve.append({"step": step, "rounds": rounds, "eval_loss": evaluate()})
    metrics = celgc.metrics() if config != "ddp" else {"local/clip_rate": clipped / steps}
    result = {
        "config": config,
        "local_steps": CONFIGS[config],
        "steps": steps,
        "rounds": steps if config == "ddp" else celgc.num_rounds,
        "all_reduce_calls": counts["calls"],
        "bytes_all_reduced": counts["bytes"],
        "train_time_s": train_time,
        "final_eval_loss": curve[-1]["eval_loss"],
        "final_train_loss_last64": sum(train_losses[-64:]) / len(train_losses[-64:]),
        "clip_rate": metrics.get("local/clip_rate"),
        "curve": curve,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"run_{config}.json").write_text(json.dumps(result, indent=1))


def run_local(steps: int, out: Path, only: list[str]) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from launch_utils import accelerate_launch

    results = []
    for config in CONFIGS:
        if only and config not in only:  # reuse an earlier run of the same configuration
            results.append(json.loads((out / f"run_{config}.json").read_text()))
            continue
        t0 = time.perf_counter()
        accelerate_launch(
            [__file__, "--worker", config, "--steps", str(steps), "--out", str(out)], timeout=1800, cwd=str(ROOT)
        )
        result = json.loads((out / f"run_{config}.json").read_text())
        result["launch_wall_s"] = time.perf_counter() - t0
        results.append(result)
        print(
            f"{config:10s} rounds={result['rounds']:4d} loss={result['final_eval_loss']:.4f} "
            f"time={result['train_time_s']:.1f}s",
            flush=True,
        )
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        pts = [c for c in r["curve"] if c["rounds"] > 0]
        ax.plot([c["rounds"] for c in pts], [c["eval_loss"] for c in pts], marker="o", label=r["config"])
    ax.set_xscale("log")
    ax.set_xlabel("communication rounds (all-reduce rounds per process)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"2 CPU processes, byte GPT-2 2x128, SGD lr={LR}, gamma={GAMMA}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- part `overhead`: ClipAwareCallback vs the Trainer's built-in clipping -----------------------------------------


def run_overhead(rounds: int, steps: int, micro_iters: int) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from hf_clinic import ClipAwareCallback

    torch.set_num_threads(1)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    config = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    n = 16 * steps
    ids = torch.randint(2, 1000, (n, 64), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    dataset = [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    variants = {
        "builtin": lambda: [],
        "ClipAwareCallback()": lambda: [ClipAwareCallback()],
        "ClipAwareCallback('zscore')": lambda: [ClipAwareCallback("zscore")],
        "ClipAwareCallback('percentile')": lambda: [ClipAwareCallback("percentile")],
    }
    per_round = {name: [] for name in variants}  # median step time of each (variant, round)
    per_round_p20 = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            torch.manual_seed(0)
            timer = StepTimer()
            args = TrainingArguments(
                "/tmp/hf_clinic_clip_overhead", per_device_train_batch_size=16, max_steps=steps, logging_steps=10,
                report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=1.0, disable_tqdm=True,
            )  # fmt: skip
            Trainer(
                BertForSequenceClassification(config), args, train_dataset=dataset, callbacks=[*make(), timer]
            ).train()
            times = sorted(timer.times[5:])  # drop warm-up steps
            per_round[name].append(statistics.median(times))
            per_round_p20[name].append(times[len(times) // 5])
    # Paired by round (the variants of one round ran back to back under similar load), then the median over rounds.
    paired = {
        name: statistics.median(m / b - 1 for m, b in zip(per_round[name], per_round["builtin"], strict=True))
        for name in variants
    }
    # The 20th percentile of step times is less sensitive to other processes than the median.
    paired_p20 = {
        name: statistics.median(m / b - 1 for m, b in zip(per_round_p20[name], per_round_p20["builtin"], strict=True))
        for name in variants
    }

    # The clip call alone, on real gradients: Accelerate's own clip_grad_norm_ vs the schedule's interception, both
    # when nothing is clipped (threshold 1.0 > norm) and when everything is (threshold 0.05).
    from accelerate import Accelerator

    from hf_clinic import ClipAwareSchedule

    accelerator = Accelerator(cpu=True)
    model = BertForSequenceClassification(config)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters()))
    model(input_ids=ids[:16], labels=labels[:16]).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    builtin = getattr(Accelerator.clip_grad_norm_, "__wrapped__", Accelerator.clip_grad_norm_)
    cases = {
        "builtin (no clip)": ("builtin", 1.0),
        "builtin (clip)": ("builtin", 0.05),
        "fixed (no clip)": ({"policy": "fixed", "max_norm": 1.0}, None),
        "fixed (clip)": ({"policy": "fixed", "max_norm": 0.05}, None),
        "zscore": ({"policy": "zscore"}, None),
        "percentile": ({"policy": "percentile"}, None),
    }
    samples = {name: [] for name in cases}
    for _ in range(10):  # interleaved blocks
        for name, (spec, max_norm) in cases.items():
            schedule = None
            if spec != "builtin":
                schedule = ClipAwareSchedule(**spec).attach(optimizer, model, observe_in_step=False)
            for _ in range(micro_iters // 10):
                for p, grad in zip(model.parameters(), grads, strict=True):
                    p.grad = grad.clone()
                t0 = time.perf_counter()
                if schedule is None:
                    builtin(accelerator, model.parameters(), max_norm)
                else:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                samples[name].append(time.perf_counter() - t0)
            if schedule is not None:
                schedule.detach()
    micro = {name: statistics.median(t) for name, t in samples.items()}

    # What else the callback adds to every step: the optimizer pre/post-step hooks and the on_pre_optimizer_step
    # check (the metrics() call only happens on logging steps).
    schedule = ClipAwareSchedule("fixed", max_norm=1.0).attach(optimizer, model, observe_in_step=False)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    inner = optimizer.optimizer
    t0 = time.perf_counter()
    for _ in range(micro_iters * 10):
        schedule._already_observed()
        schedule._pre_step(inner, (), {})
        schedule._post_step(inner, (), {})
    micro["hooks + check, per step"] = (time.perf_counter() - t0) / (micro_iters * 10)
    schedule.detach()
    base = statistics.median(per_round["builtin"])
    return {
        "median_step_s": {name: statistics.median(t) for name, t in per_round.items()},
        "per_round_median_step_s": per_round,
        "per_round_p20_step_s": per_round_p20,
        "paired_overhead_vs_builtin": paired,
        "paired_overhead_p20_vs_builtin": paired_p20,
        "clip_call_median_s": micro,
        "clip_call_delta_over_step": {
            "fixed (no clip)": (micro["fixed (no clip)"] - micro["builtin (no clip)"]) / base,
            "fixed (clip)": (micro["fixed (clip)"] - micro["builtin (clip)"]) / base,
            "zscore": (micro["zscore"] - micro["builtin (clip)"]) / base,
            "percentile": (micro["percentile"] - micro["builtin (clip)"]) / base,
            "hooks + check, per step": micro["hooks + check, per step"] / base,
        },
        "rounds": rounds,
        "steps": steps,
    }


# ---- driver -----------------------------------------------------------------------------------------------------


def summary(local: list[dict] | None, overhead: dict | None, args) -> str:
    lines = []
    if local:
        ref = next(r for r in local if r["config"] == "celgc-I1")
        lines += [
            f"Local clipping: 2 processes (gloo, 1 thread each), {local[0]['steps']} SGD steps, lr={LR}, gamma={GAMMA}, "
            f"{local[0]['params'] / 1e6:.2f}M parameters, batch {BATCH}x{SEQ} bytes per process.",
            "",
            "| config | I | rounds | all-reduce calls | MB all-reduced | train time (s) | held-out loss | "
            "vs celgc-I1 | clip rate |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in local:
            lines.append(
                f"| {r['config']} | {r['local_steps']} | {r['rounds']} | {r['all_reduce_calls']} | "
                f"{r['bytes_all_reduced'] / 1e6:.1f} | {r['train_time_s']:.1f} | {r['final_eval_loss']:.4f} | "
                f"{100 * (r['final_eval_loss'] / ref['final_eval_loss'] - 1):+.1f}% | "
                f"{r['clip_rate'] if r['clip_rate'] is None else round(r['clip_rate'], 3)} |"
            )
        lines.append("")
    if overhead:
        lines += [
            f"ClipAwareCallback overhead: Trainer, 1 process, 1 thread, BERT 2x128 (seq 64, batch 16), "
            f"{overhead['rounds']} interleaved rounds x {overhead['steps']} steps per variant; overhead = median over "
            f"rounds of (variant / built-in) - 1.",
            "",
            "| variant | median step (ms) | overhead (medians) | overhead (20th percentiles) |",
            "|---|---|---|---|",
        ]
        for name, median in overhead["median_step_s"].items():
            lines.append(
                f"| {name} | {1e3 * median:.2f} | {100 * overhead['paired_overhead_vs_builtin'][name]:+.2f}% | "
                f"{100 * overhead['paired_overhead_p20_vs_builtin'][name]:+.2f}% |"
            )
        lines += [
            "",
            "The clip call alone (median over interleaved blocks, same gradients), and its difference from the",
            "built-in call as a fraction of the median built-in step:",
            "",
            "| call | median (us) | delta / step |",
            "|---|---|---|",
        ]
        for name, median in overhead["clip_call_median_s"].items():
            delta = overhead["clip_call_delta_over_step"].get(name)
            lines.append(f"| {name} | {1e6 * median:.1f} | {'' if delta is None else f'{100 * delta:+.3f}%'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("local", "overhead", "all"), default="all")
    parser.add_argument("--steps", type=int, default=448)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--configs", default="", help="Comma-separated subset of configurations to (re-)run.")
    parser.add_argument("--overhead-rounds", type=int, default=8)
    parser.add_argument("--overhead-steps", type=int, default=45)
    parser.add_argument("--micro-iters", type=int, default=400)
    parser.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_at_start": os.getloadavg(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    local = overhead = None
    if args.part in ("local", "all"):
        local = run_local(args.steps, args.out, args.configs.split(",") if args.configs else [])
        (args.out / "local_clipping.json").write_text(json.dumps({"meta": meta, "runs": local}, indent=1))
        plot(local, args.out / "loss_vs_rounds.png")
    if args.part in ("overhead", "all"):
        overhead = run_overhead(args.overhead_rounds, args.overhead_steps, args.micro_iters)
        (args.out / "clip_overhead.json").write_text(json.dumps({"meta": meta, **overhead}, indent=1))
    text = summary(local, overhead, args)
    (args.out / f"summary_{args.part}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
