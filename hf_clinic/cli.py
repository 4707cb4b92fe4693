"""The `hf-clinic` command line.

```
hf-clinic report RUN_DIR            # HTML report of a Trainer run (trainer_state.json + clinic_log.jsonl)
hf-clinic diagnose MODEL_OR_CONFIG  # amplification and residual dependency, vanilla vs Admin, on a sample batch
```

Also runs as `python -m hf_clinic.cli`. Exit status: 0 on success, 2 on a usage error or bad input (missing run
directory, corrupt log, unsupported model), with a one-line `hf-clinic: error: ...` message on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .key_values import parse_key_values


__all__ = ["main"]


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit="step", leave=False, file=sys.stderr)


def _cmd_report(args) -> int:
    from .diagnostics.report import write_report
    from .diagnostics.signatures import ClinicThresholds

    overrides = parse_key_values(args.threshold, option="--threshold")
    thresholds = ClinicThresholds.from_dict(overrides) if overrides else None
    path = write_report(
        args.run_dir,
        args.output,
        thresholds=thresholds,
        images_dir=args.images_dir,
        progress=_progress(not args.no_progress, "plots"),
    )
    print(f"Report written to {path}")
    return 0


def _cmd_diagnose(args) -> int:
    from .diagnostics.diagnose import build_sample_batch, diagnose_model, load_model, plot_diagnosis

    omega = args.omega
    try:
        omega = float(omega)
    except ValueError:
        pass
    overrides = parse_key_values(args.set, option="--set")
    steps = ["load", "profile", "plots"]
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="diagnose", unit="step", leave=False, file=sys.stderr)
    model, description, tokenizer_path = load_model(args.model_or_config, overrides=overrides, init=args.init)
    batch, source = build_sample_batch(
        model, tokenizer_path, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    if bar:
        bar.update(1)
    result = diagnose_model(
        model,
        batch,
        description=description,
        eps=args.eps,
        seed=args.seed,
        omega=omega,
        admin=not args.no_admin,
        progress=_progress(not args.no_progress, "measure"),
    )
    if bar:
        bar.update(1)
    paths = plot_diagnosis(result, args.output_dir)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=1)
        paths.append(args.json)
    if bar:
        bar.update(1)
        bar.close()
    print(f"{result.model_type}: {description}")
    print(f"sample batch: {tuple(batch['input_ids'].shape)}, {source}; eps={args.eps}, seed={args.seed}")
    print()
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-clinic",
        description="The training clinic: diagnose why a Transformer is hard to train, and show it in plots.",
        epilog="Definitions: Liu et al., 'Understanding the Difficulty of Training Transformers', arXiv:2004.08249.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    report = sub.add_parser(
        "report",
        help="write an HTML report of a Trainer run",
        description=(
            "Read a Trainer output directory (trainer_state.json, or the latest checkpoint's, and the clinic_log.jsonl "
            "that ClinicCallback writes) and write a self-contained HTML page with plots and plain-language findings."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the Trainer's output_dir")
    report.add_argument("-o", "--output", help="HTML path (default: RUN_DIR/clinic_report.html)")
    report.add_argument("--images-dir", help="also write every plot as a PNG file into this folder")
    report.add_argument(
        "--threshold",
        action="append",
        metavar="KEY=VALUE",
        help="re-check the findings with this threshold (repeatable), e.g. --threshold update_ratio=0.02; keys: "
        "amplification, amplification_growth, min_sublayers, update_ratio, early_steps, clip_rate, clip_window",
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(func=_cmd_report)

    diagnose = sub.add_parser(
        "diagnose",
        help="profile a model: amplification and residual dependency, vanilla vs Admin",
        description=(
            "Load a model (a checkpoint folder, a config.json, or a model type such as bert, marian, t5 with --set "
            "overrides), run it on a sample batch, and print a per-sublayer table of residual dependency β² and "
            "amplification for the model as given and with Admin applied; write the comparison plots."
        ),
    )
    diagnose.add_argument(
        "model_or_config", metavar="MODEL_OR_CONFIG", help="model folder, config JSON, or model type"
    )
    diagnose.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override (repeatable), e.g. --set num_hidden_layers=18",
    )
    diagnose.add_argument(
        "--init",
        choices=("as-is", "paper"),
        default="as-is",
        help="'paper': re-initialise like the paper's from-scratch experiments (Xavier), where Admin matters",
    )
    diagnose.add_argument("--batch-size", type=int, default=8, help="sample batch size (default 8)")
    diagnose.add_argument("--seq-len", type=int, default=32, help="sample sequence length (default 32)")
    diagnose.add_argument("--eps", type=float, default=1e-3, help="relative perturbation size (default 1e-3)")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the batch and the perturbation (default 0)")
    diagnose.add_argument(
        "--omega", default="profile", help="Admin's ω: profile, closed_form or a number (default profile)"
    )
    diagnose.add_argument("--no-admin", action="store_true", help="profile the model as given only")
    diagnose.add_argument(
        "-o", "--output-dir", default="hf-clinic-diagnose", help="folder for the plots (default ./hf-clinic-diagnose)"
    )
    diagnose.add_argument("--json", help="also write the numbers to this JSON file")
    diagnose.add_argument("--no-progress", action="store_true", help="no progress bars")
    diagnose.set_defaults(func=_cmd_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-clinic` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .diagnostics.clinic_log import ClinicLogError

    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ClinicLogError, ValueError, ImportError) as err:
        print(f"hf-clinic: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
