"""Model cards that say exactly how an hf-clinic model was trained.

A card written by `Trainer.create_model_card` lists the hyper-parameters of `TrainingArguments`, but not what
hf-clinic changed: which optimizer variant ran and with which settings, whether Admin re-weighted the residuals (and
to what ω), which clipping policy ran and how often it clipped, on what hardware and with which command. It also
cannot say whether the published weights are a stock checkpoint. This module collects those facts into a
[`TrainingRecord`] (by hand, or from a finished `Trainer` with [`record_from_trainer`]) and renders it with
`huggingface_hub.ModelCard.from_template` from the Jinja template in `model_cards/`:

* metadata: `library_name`, `tags` (always `hf-clinic`), `datasets`, `metrics`, `base_model` and a `model-index`
  with one result per (split, metric), plus an `hf_clinic:` mapping that tools can read back through
  `ModelCardData`;
* body: results, how to load the model, optimizer, Admin ω summary, clipping policy and clip rate, hyper-parameters,
  hardware, the command, framework versions and citations.

NOTE: the template lives in the repository's `model_cards/` folder (next to the recipes), not inside the package;
pass `template_path=` when hf_clinic is installed from a wheel.

References:
    Mitchell et al., "Model Cards for Model Reporting", FAccT 2019, arXiv 1810.03993.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


__all__ = [
    "DEFAULT_TEMPLATE",
    "MetricResult",
    "TrainingRecord",
    "admin_summary",
    "clipping_summary",
    "command_line",
    "hardware_summary",
    "model_card_data",
    "optimizer_summary",
    "record_from_trainer",
    "render_model_card",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"

# Display names of the metrics the recipes report (keys are `evaluate`'s metric ids, as on the Hub).
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "matthews_correlation": "Matthews Correlation",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
    "bleu": "BLEU",
    "chrf": "chrF",
}

TASK_NAMES = {
    "text-classification": "Text Classification",
    "translation": "Translation",
    "text2text-generation": "Text2Text Generation",
}

# What a reader needs to look up each hf-clinic component the card mentions.
CITATIONS = {
    "radam": 'Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020, arXiv 1908.03265',
    "lamb": 'You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, '
    "arXiv 1904.00962",
    "lars": 'You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888',
    "gsignsgd": 'Crawshaw et al., "Robustness to Unbounded Smoothness of Generalized SignSGD", NeurIPS 2022, '
    "arXiv 2208.11195",
    "admin": 'Liu et al., "Understanding the Difficulty of Training Transformers", EMNLP 2020, arXiv 2004.08249',
    "step_length": 'Zhang, Jin, Fang, Wang, "Improved Analysis of Clipping Algorithms for Non-convex Optimization", '
    "NeurIPS 2020, arXiv 2010.02519",
    "percentile": 'Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", '
    "MLSP 2020, arXiv 2007.14469",
    "zscore": 'Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507',
    "unitwise": 'Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", ICML 2021, '
    "arXiv 2102.06171",
}

# Command-line options whose values must never reach a public card.
_SECRET_OPTIONS = ("token", "password", "secret", "api_key")


@dataclass
class MetricResult:
    """One evaluation number: `metric` (an `evaluate` metric id such as `accuracy`) on `split`, as `value`."""

    metric: str
    value: float
    split: str = "validation"
    name: str | None = None

    def __post_init__(self):
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"Metric {self.metric!r} on {self.split!r} is not finite: {self.value}")
        self.value = value
        if self.name is None:
            self.name = METRIC_NAMES.get(self.metric, self.metric)


@dataclass
class TrainingRecord:
    """Everything a model card says about one training run.

    Args:
        model_name (`str`): the model's name (the repository name on the Hub).
        task_type (`str`): a Hub task id, e.g. `text-classification` or `translation`.
        dataset_id (`str`): the dataset's Hub id, e.g. `nyu-mll/glue`, even when the run read local files.
        dataset_name (`str`): a readable dataset name, e.g. `GLUE SST-2`.
        results (`list[MetricResult]`): the evaluation numbers; each becomes a `model-index` entry.
        dataset_config (`str`, *optional*): the dataset configuration, e.g. `sst2`.
        dataset_note (`str`, *optional*): where the data actually came from (local files, sample sizes).
        base_model (`str`, *optional*): the Hub id of the checkpoint that was fine-tuned; `None` from scratch.
        architecture (`str`, *optional*): the model class, e.g. `BertForSequenceClassification`.
        language (`list[str]`, *optional*): ISO codes of the languages.
        license (`str`, *optional*): the license of the published weights.
        optimizer (`dict`, *optional*): see [`optimizer_summary`].
        admin (`dict`, *optional*): see [`admin_summary`]; `None` when Admin was not used.
        clipping (`dict`, *optional*): see [`clipping_summary`].
        hyperparameters (`dict`, *optional*): other settings worth reporting (batch size, epochs, seed, ...).
        hardware (`dict`, *optional*): see [`hardware_summary`].
        command (`str`, *optional*): the command that trained the model (secrets redacted, see [`command_line`]).
        stock_export (`bool`, *optional*, defaults to `True`): whether the published weights are a stock checkpoint
            that loads with plain transformers (no hf_clinic).
        export_check (`str`, *optional*): how the export was verified, e.g. the max logit difference.
        tags (`list[str]`, *optional*): extra tags; `hf-clinic` is always added.
        extra (`dict`, *optional*): extra template variables.
    """

    model_name: str
    task_type: str
    dataset_id: str
    dataset_name: str
    results: list[MetricResult]
    dataset_config: str | None = None
    dataset_note: str | None = None
    base_model: str | None = None
    architecture: str | None = None
    language: list[str] | None = None
    license: str | None = None
    optimizer: dict[str, Any] = field(default_factory=dict)
    admin: dict[str, Any] | None = None
    clipping: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    stock_export: bool = True
    export_check: str | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.model_name:
            raise ValueError("TrainingRecord needs a non-empty model_name")
        self.results = [r if isinstance(r, MetricResult) else MetricResult(**r) for r in self.results]


def model_card_data(record: TrainingRecord) -> ModelCardData:
    """The card's YAML metadata for `record`: `library_name`, tags, datasets, metrics and a `model-index`.

    The `hf_clinic:` mapping holds the training facts in machine-readable form (optimizer, Admin, clipping,
    stock export); it round-trips through `ModelCardData` and `ModelCard.load`.
    """
    eval_results = [
        EvalResult(
            task_type=record.task_type,
            task_name=TASK_NAMES.get(record.task_type, record.task_type),
            dataset_type=record.dataset_id,
            dataset_name=record.dataset_name,
            dataset_config=record.dataset_config,
            dataset_split=r.split,
            metric_type=r.metric,
            metric_value=round(r.value, 6),
            metric_name=r.name,
        )
        for r in record.results
    ]
    tags = ["hf-clinic"] + [t for t in record.tags if t != "hf-clinic"]
    clip_tag = _clip_policy(record) if (record.clipping or {}).get("by_hf_clinic") else None
    for component in (record.optimizer.get("name"), "admin" if record.admin else None, clip_tag):
        if component and component not in tags:
            tags.append(component)
    clinic = {
        "version": _hf_clinic_version(),
        "optimizer": record.optimizer.get("name"),
        "admin": bool(record.admin),
        "clip_policy": _clip_policy(record) or "none",
        "stock_export": bool(record.stock_export),
    }
    if record.optimizer.get("optim_args"):
        clinic["optim_args"] = record.optimizer["optim_args"]
    if record.admin:
        clinic["admin_sites"] = record.admin.get("num_sites")
        if record.admin.get("omega_mean") is not None:
            clinic["admin_omega_mean"] = round(float(record.admin["omega_mean"]), 4)
    if record.clipping and record.clipping.get("clip_rate") is not None:
        clinic["clip_rate"] = round(float(record.clipping["clip_rate"]), 4)
    return ModelCardData(
        model_name=record.model_name,
        base_model=record.base_model,
        datasets=[record.dataset_id],
        language=record.language,
        license=record.license,
        library_name="transformers",
        metrics=list(dict.fromkeys(r.metric for r in record.results)),
        pipeline_tag=record.task_type,
        tags=tags,
        eval_results=eval_results or None,
        hf_clinic=clinic,
    )


def render_model_card(record: TrainingRecord, template_path: str | os.PathLike | None = None) -> ModelCard:
    """Render `record` into a `huggingface_hub.ModelCard` from a Jinja template.

    Args:
        record (`TrainingRecord`): the facts to publish.
        template_path (`str` or `os.PathLike`, *optional*, defaults to `model_cards/template.md`): the template.

    Returns:
        `huggingface_hub.ModelCard`: call `.save(path)` or `.push_to_hub(repo_id)`.

    Raises:
        `FileNotFoundError`: the template is missing (hf_clinic installed without the repository's `model_cards/`).
    """
    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {str(path)!r} not found. It ships in the hf-clinic repository's model_cards/ "
            "folder; pass template_path= to use another one."
        )
    data = model_card_data(record)
    citations = [CITATIONS[k] for k in (record.optimizer.get("family"), "admin" if record.admin else None) if k]
    if _clip_policy(record) in CITATIONS:
        citations.append(CITATIONS[_clip_policy(record)])
    return ModelCard.from_template(
        data,
        template_path=str(path),
        record=record,
        task_name=TASK_NAMES.get(record.task_type, record.task_type),
        results=record.results,
        hyperparameters=record.hyperparameters,
        optimizer=record.optimizer,
        admin=record.admin,
        clipping=record.clipping,
        hardware=record.hardware,
        citations=citations,
        hf_clinic_version=_hf_clinic_version(),
        framework_versions=_framework_versions(),
        **record.extra,
    )


# --------------------------------------------------------------------------------------------------------------
# Collecting the facts from a finished run
# --------------------------------------------------------------------------------------------------------------


def optimizer_summary(args, optimizer=None) -> dict[str, Any]:
    """The optimizer as the card reports it: the `--optim` name, `optim_args`, class and its non-default settings.

    Args:
        args (`transformers.TrainingArguments`): the run's arguments.
        optimizer (`torch.optim.Optimizer`, *optional*): the optimizer the Trainer built (wrappers are unwrapped).
    """
    name = getattr(args.optim, "value", args.optim)
    summary: dict[str, Any] = {
        "name": str(name),
        "family": _optimizer_family(str(name)),
        "optim_args": args.optim_args or None,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": _number(args.warmup_steps),
        "warmup": _warmup_text(args.warmup_steps),
    }
    inner = optimizer
    # Accelerate's wrapper forwards nothing; report the optimizer the user asked for.
    while inner is not None and type(inner).__name__ == "AcceleratedOptimizer":
        inner = inner.optimizer
    if inner is not None:
        cls = type(inner)
        summary["class"] = f"{cls.__module__}.{cls.__qualname__}"
        # lr and weight decay come from the arguments (per group); the rest are the optimizer's own settings
        summary["settings"] = {
            k: _plain(v)
            for k, v in sorted(getattr(inner, "defaults", {}).items())
            if k not in ("lr", "weight_decay") and _is_reportable(k, v)
        }
    return summary


def admin_summary(model, report=None) -> dict[str, Any] | None:
    """Admin's residual weights: one row per site with ω at initialisation (from `report`) and after training.

    ω lives as parameters named `admin_omega` on the norm modules (the hf-clinic Admin contract), so the trained
    values are read from `model` whether Admin was applied by `AdminCallback` or by `apply_admin`. Sites that
    `apply_admin(exportable=True)` keeps at exactly ω = 1 without a parameter (Marian's first sublayers) come from
    `report` and are marked `fixed`.

    Args:
        model (`torch.nn.Module`): the trained model (unwrapped).
        report (`hf_clinic.admin.AdminReport`, *optional*): what `apply_admin` did (initial ω, how it was chosen).

    Returns:
        `dict` or `None`: `None` when the model carries no Admin parameter.
    """
    from .admin import OMEGA_NAME

    trained = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(f".{OMEGA_NAME}"):
            trained[name[: -len(OMEGA_NAME) - 1]] = float(tensor.detach().float().mean())
    if not trained:
        return None
    sites = []
    for site in getattr(report, "sites", None) or []:
        fixed = bool(getattr(site, "fixed", False))
        final = 1.0 if fixed else trained.pop(site.name, None)
        sites.append({"site": site.name, "omega_init": float(site.omega), "omega": final, "fixed": fixed})
    sites += [{"site": k, "omega_init": None, "omega": v, "fixed": False} for k, v in trained.items()]
    values = [s["omega"] for s in sites if s["omega"] is not None and not s["fixed"]]
    summary: dict[str, Any] = {
        "num_sites": len(sites),
        "num_trainable": len(values),
        "omega_min": min(values),
        "omega_mean": sum(values) / len(values),
        "omega_max": max(values),
        "sites": sites,
    }
    for key in ("omega_init", "wiring", "trainable", "exportable", "num_batches", "num_processes"):
        value = getattr(report, key, None)
        if isinstance(value, (str, bool, int, float)):
            summary[key] = value
    return summary


def clipping_summary(args, log_history, clip=None) -> dict[str, Any]:
    """The clipping policy and how often it clipped over the whole run.

    Args:
        args (`transformers.TrainingArguments`): the run's arguments (`max_grad_norm`).
        log_history (`list[dict]`): `trainer.state.log_history`.
        clip (*optional*): the `hf_clinic.clipping` object that clipped: a `ClipAwareCallback`, a
            `ClipAwareSchedule` or a `ClipPolicy`. `None`: the Trainer's built-in clipping.

    With an hf-clinic schedule the clip rate is its own count of clipped optimizer steps. With the Trainer's built-in
    clipping it is estimated from the logged pre-clip `grad_norm` (logging steps only, so a sample).
    """
    summary: dict[str, Any] = {"max_grad_norm": args.max_grad_norm}
    if clip is not None:
        schedule = getattr(clip, "schedule", clip)
        policy = getattr(schedule, "policy", schedule)
        summary["policy"] = str(getattr(policy, "name", "") or _policy_name(policy))
        summary["description"] = repr(policy)
        summary["by_hf_clinic"] = True
        steps, clipped = getattr(schedule, "num_steps", None), getattr(schedule, "num_clipped", None)
        if isinstance(steps, int) and isinstance(clipped, int) and steps > 0:
            summary["clip_rate"] = clipped / steps
            summary["clip_rate_source"] = f"{clipped} of {steps} optimizer steps clipped"
        else:
            rates = [h["clip/rate"] for h in log_history if "clip/rate" in h]
            if rates:
                summary["clip_rate"] = sum(rates) / len(rates)
                summary["clip_rate_source"] = f"mean of the {len(rates)} logged clip/rate values"
        skipped = getattr(schedule, "num_skipped", None)
        if isinstance(skipped, int):
            summary["skipped_steps"] = skipped
        thresholds = [h["clip/threshold"] for h in log_history if "clip/threshold" in h]
        if thresholds:
            summary["last_threshold"] = float(thresholds[-1])
        return summary
    summary["policy"] = "fixed" if args.max_grad_norm and args.max_grad_norm > 0 else "none"
    summary["description"] = "transformers.Trainer built-in clipping (clip_grad_norm_ at max_grad_norm)"
    summary["by_hf_clinic"] = False
    norms = [h["grad_norm"] for h in log_history if "grad_norm" in h and h["grad_norm"] is not None]
    if summary["policy"] == "fixed" and norms:
        summary["clip_rate"] = sum(float(n) > args.max_grad_norm for n in norms) / len(norms)
        summary["clip_rate_source"] = f"fraction of the {len(norms)} logged steps whose pre-clip grad_norm exceeded it"
    return summary


def hardware_summary() -> dict[str, Any]:
    """Where the run happened: processor, core count, accelerator, number of processes and mixed precision."""
    import torch

    summary: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "num_processes": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        summary["accelerator"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        summary["accelerator"] = "none (CPU)"
    from accelerate.state import PartialState

    # Only read a state the run already created; creating one here could start a process group.
    if PartialState._shared_state:
        state = PartialState()
        summary["num_processes"] = state.num_processes
        summary["distributed_type"] = str(getattr(state.distributed_type, "value", state.distributed_type))
    return summary


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a user would retype it, with secret values redacted.

    Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) the launcher is prefixed.
    """
    argv = list(sys.argv if argv is None else argv)
    redacted, hide_next = [], False
    for arg in argv:
        if hide_next:
            redacted.append("REDACTED")
            hide_next = False
            continue
        option = arg.lstrip("-").split("=", 1)[0].lower()
        is_secret = arg.startswith("-") and any(s in option for s in _SECRET_OPTIONS)
        if is_secret and "=" in arg:
            redacted.append(arg.split("=", 1)[0] + "=REDACTED")
        else:
            redacted.append(arg)
            hide_next = is_secret
    if redacted and redacted[0].endswith(".py"):
        redacted[0] = os.path.relpath(redacted[0]) if os.path.isabs(redacted[0]) else redacted[0]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"accelerate launch --num_processes {world}" if world > 1 else "python"
    return " ".join([prefix, *map(shlex.quote, redacted)])


def record_from_trainer(
    trainer,
    *,
    task_type: str,
    dataset_id: str,
    dataset_name: str,
    results: list[MetricResult],
    clip=None,
    admin_report=None,
    stock_export: bool = True,
    **kwargs,
) -> TrainingRecord:
    """Build a [`TrainingRecord`] from a finished `transformers.Trainer`.

    Args:
        trainer (`transformers.Trainer`): the trainer after `train()`.
        task_type, dataset_id, dataset_name, results: see [`TrainingRecord`].
        clip (*optional*): the `hf_clinic.clipping` callback, schedule or policy that clipped (see
            [`clipping_summary`]); `None` for the Trainer's built-in clipping.
        admin_report (*optional*): the `AdminReport` from Admin's profiling (for the initial ω per site).
        stock_export (`bool`, *optional*, defaults to `True`): whether the published weights are a stock export.
        kwargs: any other [`TrainingRecord`] field (`base_model`, `command`, `license`, ...).
    """
    args, state = trainer.args, trainer.state
    model = trainer.model
    hyperparameters = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * max(1, args.world_size),
        "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        "optimizer_steps": state.global_step,
        "seed": args.seed,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
    }
    hyperparameters.update(kwargs.pop("hyperparameters", {}))
    runtime = next((h.get("train_runtime") for h in reversed(state.log_history) if "train_runtime" in h), None)
    if runtime is not None:
        hyperparameters["train_runtime_s"] = round(float(runtime), 1)
    kwargs.setdefault("architecture", type(model).__name__)
    kwargs.setdefault("command", command_line())
    kwargs.setdefault("hardware", hardware_summary())
    return TrainingRecord(
        task_type=task_type,
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        results=results,
        optimizer=optimizer_summary(args, trainer.optimizer),
        admin=admin_summary(model, admin_report),
        clipping=clipping_summary(args, state.log_history, clip),
        hyperparameters={k: v for k, v in hyperparameters.items() if v is not None},
        stock_export=stock_export,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _clip_policy(record: TrainingRecord) -> str | None:
    return (record.clipping or {}).get("policy")


def _optimizer_family(name: str) -> str | None:
    for family in ("radam", "lamb", "lars", "gsignsgd"):
        if name == family or name.startswith(family + "_"):
            return family
    return None


def _policy_name(policy) -> str:
    name = type(policy).__name__
    for suffix in ("ClipPolicy", "Policy", "Clipping"):
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _number(value):
    value = float(value)
    return int(value) if value.is_integer() else value


def _warmup_text(warmup) -> str:
    warmup = float(warmup)
    if warmup <= 0:
        return "none"
    if warmup < 1:
        return f"linear, over {100 * warmup:g}% of the steps"
    return f"linear, over {int(warmup)} steps"


def _is_reportable(key: str, value) -> bool:
    if key in ("params", "differentiable", "capturable", "foreach", "fused"):
        return False
    return value is None or isinstance(value, (bool, int, float, str, tuple, list))


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hf_clinic_version() -> str:
    from . import __version__

    return __version__


def _framework_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"hf_clinic": _hf_clinic_version()}
    for dist in ("transformers", "torch", "accelerate", "datasets", "tokenizers", "huggingface_hub"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions
