"""Translation results (issue 6): Multi30k en->de, 6+6 Marian from scratch: Adam + warmup vs RAdam vs RAdam + Admin.

Every run is the translation recipe itself (`recipes/translation.py`) started as a subprocess on the full, real
Multi30k task-1 data staged offline (`../shared/data/multi30k/task1/raw`: 29,000 training pairs, val 1,014,
test_2016_flickr 1,000), same seed, same model and data:

* model: Post-LN Marian, 6 encoder + 6 decoder layers, d_model 256, 4 heads, FFN 1024, ReLU, dropout 0.3
  (`--dropout`), tied embeddings, a joint 8,000-piece Unigram tokenizer trained on the training pairs; the Admin
  paper's from-scratch init (`--paper_init`: Xavier-uniform linears, N(0, d^-1/2) embeddings) for all three runs;
* training: batch 128 sentence pairs (batches grouped by length, to cut padding on CPU), lr 5e-4 (`--learning_rate`)
  with linear decay, beta2 0.98, weight decay 1e-4, label smoothing 0.1, max_grad_norm 1.0, 12 epochs by default;
* `adam_warmup`: `--optim adamw_torch --no_admin`, linear warmup over 8% of the steps (~270);
* `radam`: `--optim radam --no_admin`, no warmup;
* `radam_admin`: `--optim radam --admin` (ω profiled on the first batch), no warmup: the recipe's defaults;
* evaluation: sacrebleu corpus BLEU and chrF (13a tokenization, cased, detokenized text) on val and
  test_2016_flickr with beam search (5 beams), after training.

Target from the issue: BLEU >= 30 on test_2016_flickr for the best configuration.

CPU budget: the issue's "6+6-layer Marian" is the Transformer-base depth; on 2 CPU cores d_model is reduced to 256
(Transformer-small widths) and training to 12 epochs (~6 h for the three runs). Reduced runs: `--epochs` (fractions
allowed), `--max_train_samples`, `--max_eval_samples` (validation pairs; 0 skips the validation evaluation),
`--max_predict_samples`, `--beams`, `--threads`, `--d_model`, `--ffn_dim`; `--configs` picks configurations, and
`--out`/`--work` keep a second set of results (e.g. a longer run of the best configuration) beside the first.
`results.json` and the summary state exactly what was run: epochs, optimizer steps, model and data sizes, beams,
threads, and each run's wall and CPU time (training and evaluation separately). Each run is read against two
references computed from its own tokenizer: the unigram loss (the label-smoothed loss of predicting token frequencies,
which a model that learned nothing from the source or the prefix would reach) and the mean length of the test
references.

Usage:
    nice -n 10 python benchmarks/mt_results.py                      # full runs (hours on 2 CPU cores)
    nice -n 10 python benchmarks/mt_results.py --epochs 1 --max_eval_samples 0 --threads 1   # a reduced run
    nice -n 10 python benchmarks/mt_results.py --smoke              # a few steps of every run: checks the pipeline
    python benchmarks/mt_results.py --report-only --update-results  # re-plot + rewrite the RESULTS.md section

Writes `results.json`, `mt_loss.png` and `summary.md` under `benchmarks/results/mt/` (smoke runs: under
`benchmarks/_work/mt_smoke/`), the runs' output folders under `benchmarks/_work/mt/`, and with `--update-results`
the section "Translation recipe (issue 6)" of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from results_md import update_results_md  # benchmarks/: the script's folder


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k" / "task1" / "raw"
OUT = ROOT / "benchmarks" / "results" / "mt"
WORK = ROOT / "benchmarks" / "_work"
SECTION = "Translation recipe (issue 6)"

CONFIGS = {
    "adam_warmup": ["--optim", "adamw_torch", "--no_admin", "--warmup_steps", "0.08"],
    "radam": ["--optim", "radam", "--no_admin", "--warmup_steps", "0"],
    "radam_admin": ["--optim", "radam", "--admin", "--warmup_steps", "0"],
}
LABELS = {"adam_warmup": "Adam + 8% warmup", "radam": "RAdam, no warmup", "radam_admin": "RAdam + Admin, no warmup"}
# What a run is, besides its configuration: saved in results.json and restored by --report-only.
SETUP_KEYS = (
    "epochs", "d_model", "heads", "ffn_dim", "dropout", "learning_rate", "batch_size", "beams", "threads", "parallel",
    "max_train_samples", "max_eval_samples", "max_predict_samples", "smoke",
)  # fmt: skip
LABEL_SMOOTHING = 0.1
SMOKE = {"max_steps": 3, "max_train_samples": 512, "max_eval_samples": 32, "max_predict_samples": 32, "beams": 2}


def command(config: str, args, out_dir: Path) -> list[str]:
    evaluate_val = args.max_eval_samples != 0
    # fmt: off
    cmd = [
        sys.executable, "recipes/translation.py",
        "--data_dir", str(args.data_dir), "--source_lang", "en", "--target_lang", "de",
        "--train_split", "train", "--validation_split", "val", "--test_split", "test_2016_flickr",
        "--do_train", "--do_eval", str(evaluate_val).lower(), "--do_predict",
        "--model_type", "marian", "--encoder_layers", "6", "--decoder_layers", "6", "--d_model", str(args.d_model),
        "--attention_heads", str(args.heads), "--ffn_dim", str(args.ffn_dim), "--dropout", str(args.dropout),
        "--vocab_size", "8000",
        "--paper_init", *CONFIGS[config],
        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "linear", "--adam_beta2", "0.98",
        "--weight_decay", "1e-4", "--label_smoothing_factor", str(LABEL_SMOOTHING), "--max_grad_norm", "1.0",
        "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "64", "--generation_num_beams", str(args.beams),
        "--generation_max_length", "32" if args.smoke else "128",
        "--train_sampling_strategy", "group_by_length",
        "--logging_steps", "1" if args.smoke else "20", "--save_strategy", "no", "--eval_strategy", "no",
        "--seed", "42", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out_dir),
    ]
    # fmt: on
    for key in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        if getattr(args, key):
            cmd += [f"--{key}", str(getattr(args, key))]
    if args.smoke:
        cmd += ["--max_steps", str(SMOKE["max_steps"])]
    return cmd


def start(config: str, args, work: Path) -> dict:
    """Start one configuration's recipe run as a subprocess; `finish` waits for it and reads its results."""
    out_dir = work / config
    cmd = command(config, args, out_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    printable = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    if args.threads:
        printable = f"OMP_NUM_THREADS={args.threads} {printable}"
    print(f"\n=== {config}\n{printable}", flush=True)
    log = open(work / f"{config}.log", "w", encoding="utf-8")  # closed in finish()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"config": config, "printable": printable, "out_dir": out_dir, "log": log, "process": process,
            "start": time.time()}  # fmt: skip


def finish(job: dict, args, work: Path) -> dict:
    # wait4 gives this run's own user + system time (its children included), even while other runs go on beside it.
    _, status, usage = os.wait4(job["process"].pid, 0)
    returncode = job["process"].returncode = os.waitstatus_to_exitcode(status)
    wall, cpu = time.time() - job["start"], usage.ru_utime + usage.ru_stime
    job["log"].close()
    config, out_dir = job["config"], job["out_dir"]
    if returncode != 0:
        raise SystemExit(f"{config} failed ({returncode}); see {work / f'{config}.log'}")
    metrics = json.loads((out_dir / "all_results.json").read_text())
    state = json.loads((out_dir / "trainer_state.json").read_text())
    losses = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    return {
        "config": config,
        "command": job["printable"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # user + system time of the run's process (its children included)
        "train_s": metrics.get("train_runtime"),
        "eval_s": round(metrics.get("eval_runtime", 0) + metrics.get("test_runtime", 0), 1),
        "epochs": args.epochs,
        "epochs_run": state.get("epoch"),  # what was trained (less than `epochs` under --smoke's max_steps)
        "optimizer_steps": state["global_step"],
        "metrics": metrics,
        "loss_curve": losses,
        **reference_stats(out_dir, args),
    }


def _num_lines(path: Path) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return sum(1 for _ in f)


def unigram_loss(counts: Counter, vocab_size: int, label_smoothing: float) -> float:
    """The label-smoothed loss of the best context-free predictor: one fixed distribution over the vocabulary.

    With t = (1 - eps) * (token frequencies) + eps / V as the smoothed target, predicting p costs the cross-entropy
    H(t, p) per token, which is smallest at p = t, where it is the entropy H(t).
    """
    total = sum(counts.values())
    smoothed = [
        (1 - label_smoothing) * counts.get(v, 0) / total + label_smoothing / vocab_size for v in range(vocab_size)
    ]
    return -sum(t * math.log(t) for t in smoothed if t > 0)  # 0 log 0 = 0: an unseen token without smoothing


def reference_stats(run_dir: Path, args) -> dict:
    """What a run's numbers are read against, from its own tokenizer: the unigram loss and the test references' length.

    A training loss still near `unigram_loss` means the decoder has learned little beyond token frequencies.
    `test_output_len` re-tokenizes the written translations the same way as the references, so the two lengths
    compare directly.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    vocab_size = json.loads((run_dir / "config.json").read_text())["vocab_size"]

    def target_ids(split: str, limit: int | None) -> list[list[int]]:
        with gzip.open(args.data_dir / f"{split}.de.gz", "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f][:limit]
        return tokenizer(text_target=lines)["input_ids"]  # with </s>, as the labels and gen_len count it

    counts = Counter(token for ids in target_ids("train", args.max_train_samples) for token in ids)
    test = target_ids("test_2016_flickr", args.max_predict_samples)
    outputs = (run_dir / "generated_predictions_test.txt").read_text(encoding="utf-8").splitlines()
    return {
        "test_output_len": sum(len(ids) for ids in tokenizer(text_target=outputs)["input_ids"]) / len(outputs),
        "unigram_loss": unigram_loss(counts, vocab_size, LABEL_SMOOTHING),
        "test_ref_len": sum(map(len, test)) / len(test),
    }


def _status(run: dict) -> str:
    """`diverged` (non-finite or rising loss), `stalled` (final loss at or above the unigram loss), or `trained`."""
    values = [v for _, v in run["loss_curve"]]
    if not values:
        return "no log"
    if any(not math.isfinite(v) for v in values):
        return "diverged"
    last = max(1, len(values) // 10)  # the mean of the last tenth of the logged losses
    tail = sum(values[-last:]) / last
    if tail > values[0]:
        return "diverged"
    return "stalled" if tail >= run["unigram_loss"] else "trained"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        if r["loss_curve"]:
            xs, ys = zip(*r["loss_curve"], strict=True)
            ax.plot(
                xs, ys, label=f"{LABELS[r['config']]} (test BLEU {r['metrics'].get('test_bleu', float('nan')):.1f})"
            )
    ax.set(
        xlabel="optimizer step",
        ylabel="training loss (label-smoothed)",
        title="Multi30k en→de, 6+6 Marian from scratch",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: list[dict], args, out: Path) -> str:
    sizes = {split: _num_lines(args.data_dir / f"{split}.en.gz") for split in ("train", "val", "test_2016_flickr")}

    def used(limit, total):
        return total if limit is None else min(limit, total)

    n_train, n_val = used(args.max_train_samples, sizes["train"]), used(args.max_eval_samples, sizes["val"])
    n_test = used(args.max_predict_samples, sizes["test_2016_flickr"])
    threads = f"{args.threads} thread(s) per run" if args.threads else "torch's default threads"
    if args.parallel:
        threads += f", the {len(results)} runs side by side (sharing the cores)"
    lines = []
    if args.smoke:
        lines.append(
            f"**SMOKE RUN ({SMOKE['max_steps']} steps on {n_train} training pairs, {n_val} val / {n_test} test pairs): "
            "checks the pipeline, not results.**\n"
        )
    reduced = [f"{args.epochs:g} epoch(s)"]
    if n_train < sizes["train"]:
        reduced.append(f"the first {n_train:,} of the {sizes['train']:,} training pairs")
    lines += [
        f"A 6+6-layer Post-LN Marian (d_model {args.d_model}, {args.heads} heads, FFN {args.ffn_dim}, dropout "
        f"{args.dropout:g}; reduced from "
        "Transformer-base widths for the CPU budget) trained from scratch with `recipes/translation.py` on Multi30k "
        f"en→de, offline, seed 42, batch {args.batch_size} pairs, lr {args.learning_rate:g} with linear decay, "
        f"{' on '.join(reduced)} (reduced for the CPU budget). "
        f"BLEU/chrF: sacrebleu (13a, cased, detokenized), beam {args.beams}, on "
        + (f"val ({n_val:,} pairs) and " if n_val else "")
        + f"test_2016_flickr ({n_test:,} pairs){'' if n_val else '; validation not evaluated'}. "
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {threads}. "
        "Produced by `python benchmarks/mt_results.py`; each row's exact command is in `results.json`.",
        "",
        "| configuration | epochs | optimizer steps | final train loss (unigram loss) | status | val BLEU "
        "| test_2016_flickr BLEU | test chrF | test output length (reference) | training time | evaluation time "
        "| wall time (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in results:
        m = r["metrics"]
        last = r["loss_curve"][-1][1] if r["loss_curve"] else nan
        cpu = f" ({r['cpu_s'] / 60:.1f} min)" if r.get("cpu_s") is not None else ""
        train_s = r.get("train_s") or m.get("train_runtime", nan)
        eval_s = r.get("eval_s", m.get("eval_runtime", 0) + m.get("test_runtime", 0))
        val_bleu = f"{m['eval_bleu']:.2f}" if "eval_bleu" in m else "not run"
        lines.append(
            f"| {LABELS[r['config']]} | {r.get('epochs_run') or r['epochs']:.3g} | {r['optimizer_steps']} "
            f"| {last:.3f} ({r['unigram_loss']:.2f}) | {_status(r)} | {val_bleu} | {m.get('test_bleu', nan):.2f} "
            f"| {m.get('test_chrf', nan):.2f} | {r['test_output_len']:.1f} ({r['test_ref_len']:.1f}) "
            f"| {train_s / 60:.1f} min | {eval_s / 60:.1f} min | {r['wall_s'] / 60:.1f} min{cpu} |"
        )
    best = max(results, key=lambda r: r["metrics"].get("test_bleu", -1))
    bleu = best["metrics"].get("test_bleu", nan)
    walls = [r["wall_s"] for r in results]
    total = (max(walls) if args.parallel else sum(walls)) / 60  # side by side: the longest run
    lines += [
        "",
        f"Best: {LABELS[best['config']]}, test BLEU {bleu:.2f} ({'meets' if bleu >= 30 else 'misses'} the BLEU >= 30 "
        f"target). Total wall time: {total:.0f} min.",
        "",
        "Unigram loss: the label-smoothed loss of the best context-free predictor (token frequencies of the training "
        "targets, under the run's own tokenizer); `stalled` means the final loss did not get below it. Output length: "
        "mean tokens per written test translation (re-tokenized, with </s>), the references' mean in brackets; a model "
        "that has not learned to stop runs long.",
        "",
        f"![mt]({(out / 'mt_loss.png').relative_to(ROOT / 'benchmarks').as_posix()})",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--epochs", type=float, default=12, help="training epochs per run (fractions allowed)")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn_dim", type=int, default=1024)
    parser.add_argument(
        "--dropout", type=float, default=0.3, help="residual and embedding dropout (attention/activation: 0.1)"
    )
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--batch_size", type=int, default=128, help="sentence pairs per optimizer step")
    parser.add_argument("--beams", type=int, default=5, help="beam size of the BLEU evaluation")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: inherited)")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the configurations side by side (use with --threads 1 on few cores)",
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="first N training pairs (default: all)")
    parser.add_argument(
        "--max_eval_samples", type=int, default=None, help="first N val pairs (default: all; 0: no val evaluation)"
    )
    parser.add_argument("--max_predict_samples", type=int, default=None, help="first N test pairs (default: all)")
    parser.add_argument("--data_dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/mt)")
    parser.add_argument("--work", type=Path, default=None, help="the runs' folders (default: benchmarks/_work/mt)")
    parser.add_argument("--smoke", action="store_true", help="3 steps per run on a few pairs")
    parser.add_argument("--report-only", action="store_true", help="re-plot and summarise an existing results.json")
    parser.add_argument("--update-results", action="store_true", help="rewrite the section in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.smoke:
        for key in ("max_train_samples", "max_eval_samples", "max_predict_samples", "beams"):
            setattr(args, key, SMOKE[key])
    out = (args.out or (WORK / "mt_smoke" if args.smoke else OUT)).resolve()
    work = (args.work or WORK / ("mt_smoke_runs" if args.smoke else "mt")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    configs = [c for c in args.configs.split(",") if c]
    if any(c not in CONFIGS for c in configs):
        raise SystemExit(f"Unknown config in {configs}; valid: {list(CONFIGS)}")
    if not args.data_dir.is_dir():
        raise SystemExit(f"Multi30k not found at {args.data_dir} (task1/raw: train/val/test_2016_flickr .en/.de .gz)")

    results_path = out / "results.json"
    if args.report_only:
        saved = json.loads(results_path.read_text())
        results = saved["runs"]
        for key in SETUP_KEYS:
            setattr(args, key, saved.get(key, getattr(args, key)))
        # results.json written before reference_stats existed: fill in from the run folders, then save once
        missing = [run for run in results if "test_output_len" not in run]
        for run in missing:
            if not (work / run["config"] / "config.json").is_file():
                raise SystemExit(f"{run['config']}: no reference stats in {results_path} and no run folder in {work}")
            run.update(reference_stats(work / run["config"], args))
        if missing:
            results_path.write_text(json.dumps({**saved, "runs": results}, indent=1))
    else:
        setup = {key: getattr(args, key) for key in SETUP_KEYS}
        if args.parallel:
            jobs = [start(config, args, work) for config in configs]
            results = [finish(job, args, work) for job in jobs]
            results_path.write_text(json.dumps({**setup, "runs": results}, indent=1))
        else:
            results = []
            for config in configs:  # one after another; results.json keeps what has finished
                results.append(finish(start(config, args, work), args, work))
                results_path.write_text(json.dumps({**setup, "runs": results}, indent=1))
    plot(results, out / "mt_loss.png")
    text = summary(results, args, out)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    print("\n" + text)
    if args.update_results:
        if args.smoke:
            raise SystemExit("--update-results refuses smoke runs")
        # one generated block per results folder, so a longer single-configuration run sits beside the comparison
        script = "benchmarks/mt_results.py"
        if out != OUT:
            script += f" --out {out.relative_to(ROOT).as_posix()}"
        update_results_md(SECTION, text, script)


if __name__ == "__main__":
    main()
