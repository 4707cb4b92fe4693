"""Known failure signatures of Transformer training, their thresholds, and the plain-language findings they produce.

Each check is a pure function of logged numbers, so [`ClinicCallback`] runs them live during training and
`hf-clinic report` re-runs them offline on the clinic log with the same thresholds. A check returns a [`Finding`]
(what was seen, in plain words, with the evidence, and which hf-clinic remedy fits) or `None`.

| code | signature | default threshold | remedy |
|---|---|---|---|
| `amplification` | the output change under a small weight perturbation grows with depth (Post-LN) | amplification at a stack output ≥ 10, and still growing over the upper half of the stack | Admin |
| `update_spike` | the update-to-weight ratio of some layer is large during the first optimizer steps | ‖ΔW‖/‖W‖ ≥ 0.01 in one step within the first 10 steps | RAdam or lr warmup |
| `clip_saturation` | gradient clipping fires on (almost) every step | clip rate ≥ 0.9 over the last 20 optimizer steps | raise the threshold or lower the lr |
| `non_finite` | the loss or the gradient norm became NaN/inf | any | lower lr, warmup/RAdam, clipping, Admin |

Why these numbers:

* **amplification.** A single random linear map has amplification ≈ 1 (see [`measure_amplification`]). The output
  change of Post-LN grows linearly with the number of sublayers N (the paper: ≈ C Σ β_{i,i}² with β_{i,i}² ≈ 1/2),
  Pre-LN and Admin logarithmically (β_{i,i}² ≈ 1/i). Measured at from-scratch (Xavier) init on Post-LN BERT stacks
  of hidden size 64: 6 layers 5.9 (Admin 3.8), 18 layers 25.7 (Admin 6.0), 36 layers 107 (Admin 4.3); the real
  pretrained MiniLM-L6 8.9; T5 (Pre-LN) 12+12 layers 9.3; Hugging Face's N(0, 0.02²) init < 0.1 at any depth (its
  branches are tiny). The paper reports that 6-layer Post-LN trains and 18-layer Post-LN diverges: 10 separates
  them. The growth condition (the output's amplification at least `amplification_growth` = 1× the value halfway up)
  only excludes stacks whose change is created low and damped on the way up; the ratio is ≈ 2 for the linear growth
  of the theory, but real batches (padding, repeated tokens) flatten it (1.2 on the 12-layer SST-2 demo run), so it
  is not used to tell linear from logarithmic growth: the level does that. Only Post-LN stacks are checked: Admin is
  the remedy for Post-LN, and T5 already sits at Admin's target profile.
* **update_spike.** Adam's first step moves every coordinate by ≈ lr (m/√v = sign(g) at t=1), so the ratio is
  ≈ lr / rms(W): 1e-3 / 0.02 = 0.05 for a from-scratch HF model without warmup, ≈ 1e-3 for a typical fine-tuning
  lr (5e-5 on MiniLM, rms 0.04). A step that changes a layer by more than 1% of its norm before the adaptive
  learning rate's variance has settled is the early-phase instability RAdam's paper describes; warmup or RAdam's
  rectification removes it.
* **clip_saturation.** Clipping every step makes the update length ≈ lr·threshold regardless of the gradient, i.e.
  the threshold, not the schedule, sets the step size. A clip rate ≥ 0.9 sustained over 20 steps is not an
  occasional spike guard any more.

All thresholds are fields of [`ClinicThresholds`] and can be changed per callback or per report.

References:
    Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249 (amplification, Admin).
    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", arXiv:1908.03265 (RAdam, warmup).
    Zhang et al., "Why Gradient Clipping Accelerates Training", arXiv:1905.11881 (clipping as adaptive step size).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence


__all__ = [
    "ClinicThresholds",
    "Finding",
    "check_amplification",
    "check_clip_saturation",
    "check_non_finite",
    "check_update_spike",
]


@dataclasses.dataclass(frozen=True)
class ClinicThresholds:
    """Thresholds of the failure signatures (see the module docstring for the reasoning behind each default).

    Args:
        amplification (`float`, *optional*, defaults to `10.0`):
            Minimum amplification at a Post-LN stack's output for the `amplification` finding.
        amplification_growth (`float`, *optional*, defaults to `1.0`):
            Minimum ratio of the amplification at the stack output to the amplification halfway up the stack.
        min_sublayers (`int`, *optional*, defaults to `4`): stacks with fewer residual sublayers are not checked.
        update_ratio (`float`, *optional*, defaults to `0.01`):
            Per-layer ‖ΔW‖/‖W‖ of one optimizer step that counts as a spike during the first `early_steps` steps.
        early_steps (`int`, *optional*, defaults to `10`): how many optimizer steps count as "the first steps".
        clip_rate (`float`, *optional*, defaults to `0.9`): clip rate that counts as "always clipping".
        clip_window (`int`, *optional*, defaults to `20`): optimizer steps the clip rate is averaged over.
    """

    amplification: float = 10.0
    amplification_growth: float = 1.0
    min_sublayers: int = 4
    update_ratio: float = 0.01
    early_steps: int = 10
    clip_rate: float = 0.9
    clip_window: int = 20

    def __post_init__(self):
        for name in ("amplification", "amplification_growth", "update_ratio"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"Invalid {name}: {value!r}; expected a positive number")
        if not (0 < self.clip_rate <= 1):
            raise ValueError(f"Invalid clip_rate: {self.clip_rate!r}; expected a number in (0, 1]")
        for name in ("min_sublayers", "early_steps", "clip_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; expected a positive integer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ClinicThresholds:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown clinic threshold(s) {unknown}; valid: {', '.join(sorted(fields))}")
        return cls(**dict(data))


@dataclasses.dataclass
class Finding:
    """A failure signature seen in a run.

    Attributes:
        code (`str`): `"amplification"`, `"update_spike"`, `"clip_saturation"` or `"non_finite"`.
        severity (`str`): `"warning"` or `"error"`.
        step (`int`): the optimizer step at which it was seen.
        title (`str`): one line.
        message (`str`): what was seen, in plain language, with numbers.
        remedy (`str`): which hf-clinic remedy fits, and how to apply it.
        evidence (`dict`): the numbers behind it.
    """

    code: str
    severity: str
    step: int
    title: str
    message: str
    remedy: str
    evidence: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"[hf-clinic] step {self.step}: {self.title}. {self.message} Remedy: {self.remedy}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Finding:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ----------------------------------------------------------------------------------------------- amplification


def check_amplification(
    amplification: Mapping, dependency: Mapping | None, step: int, thresholds: ClinicThresholds
) -> Finding | None:
    """The `amplification` signature, from `Amplification.to_dict()` and `ResidualDependency.to_dict()` records.

    Fires for the Post-LN stack whose output amplification is largest, when it is ≥ `thresholds.amplification`
    and ≥ `thresholds.amplification_growth` × the amplification after the sublayer halfway up the stack.
    """
    if amplification.get("wiring") == "branch_gain":
        return None
    worst = None
    for stack, out in amplification.get("outputs", {}).items():
        sites = [s for s in amplification.get("sites", []) if s["stack"] == stack]
        n = len(sites)
        if n < thresholds.min_sublayers:
            continue
        a_out = float(out["amplification"])
        a_half = float(sites[math.ceil(n / 2) - 1]["amplification"])
        if not math.isfinite(a_out) or a_out < thresholds.amplification:
            continue
        growth = a_out / a_half if a_half > 0 else math.inf
        if growth < thresholds.amplification_growth:
            continue
        if worst is None or a_out > worst[1]:
            worst = (stack, a_out, a_half, growth, n)
    if worst is None:
        return None
    stack, a_out, a_half, growth, n = worst
    a_first = float([s for s in amplification["sites"] if s["stack"] == stack][0]["amplification"])
    evidence = {
        "stack": stack,
        "amplification": a_out,
        "amplification_first": a_first,
        "amplification_half": a_half,
        "growth": growth,
        "sublayers": n,
        "eps": amplification.get("eps"),
    }
    dep_text = ""
    if dependency:
        deps = [s["dependency"] for s in dependency.get("sites", []) if s["stack"] == stack]
        deps = [d for d in deps if math.isfinite(d)]
        if deps:
            mean_dep = sum(deps) / len(deps)
            evidence["dependency_mean"] = mean_dep
            evidence["dependency_pre_ln"] = sum(1 / i for i in range(1, len(deps) + 1)) / len(deps)
            dep_text = (
                f" Its sublayers lean heavily on their residual branches: on average {100 * mean_dep:.0f}% of each "
                f"sublayer's output variance comes from the branch (β² = {mean_dep:.2f}; a Pre-LN or Admin stack of "
                f"this depth averages {evidence['dependency_pre_ln']:.2f})."
            )
    return Finding(
        code="amplification",
        severity="warning",
        step=int(step),
        title=f"The output change grows with depth ({stack}: amplification {_fmt(a_out)} over {n} sublayers)",
        message=(
            f"A tiny random change of the weights is amplified {_fmt(a_out)}-fold (in squared norm) by the time it "
            f"reaches the {stack} output, up from {_fmt(a_first)} after the first sublayer and {_fmt(a_half)} halfway "
            f"up: the change builds up layer after layer. This is the amplification effect of deep Post-LN Transformers: "
            f"every optimizer step moves the output a lot, so training needs a long warmup and a small learning "
            f"rate, and tends to diverge or stall without them.{dep_text}"
        ),
        remedy=(
            "Admin. Add `hf_clinic.AdminCallback()` to the Trainer's callbacks (or call `hf_clinic.apply_admin(model, "
            "batches)` before building the optimizer): it rescales each residual so the model starts with Pre-LN-like "
            "dependencies and keeps Post-LN's quality, and it exports to a stock checkpoint. Compare both with "
            "`hf-clinic diagnose <model>`."
        ),
        evidence=evidence,
    )


# ----------------------------------------------------------------------------------------------- update spikes


def check_update_spike(
    ratios: Mapping[str, float], step: int, thresholds: ClinicThresholds, context: Mapping | None = None
) -> Finding | None:
    """The `update_spike` signature: some layer's ‖ΔW‖/‖W‖ ≥ `thresholds.update_ratio` within the first steps.

    Args:
        ratios: per-layer update-to-weight ratio of optimizer step `step` (1-based).
        context: optional run facts used in the message (`learning_rate`, `warmup_steps`, `optimizer`).
    """
    if step > thresholds.early_steps or not ratios:
        return None
    finite = {k: float(v) for k, v in ratios.items() if math.isfinite(float(v))}
    if not finite:
        return None
    layer, ratio = max(finite.items(), key=lambda kv: kv[1])
    if ratio < thresholds.update_ratio:
        return None
    context = dict(context or {})
    facts = []
    if context.get("optimizer"):
        facts.append(f"optimizer {context['optimizer']}")
    if context.get("learning_rate") is not None:
        facts.append(f"lr {_fmt(float(context['learning_rate']))}")
    if context.get("warmup_steps") is not None:
        facts.append(f"{int(context['warmup_steps'])} warmup steps")
    setting = f" ({', '.join(facts)})" if facts else ""
    return Finding(
        code="update_spike",
        severity="warning",
        step=int(step),
        title=f"Very large updates in the first steps ({layer}: {100 * ratio:.1f}% of its weights at step {step})",
        message=(
            f"At optimizer step {step}{setting}, one update changed `{layer}` by {100 * ratio:.1f}% of its weight "
            f"norm (the clinic flags more than {100 * thresholds.update_ratio:.1f}% per step during the first "
            f"{thresholds.early_steps} steps). Adam-type optimizers take near full-size steps at the start, because "
            f"their per-coordinate learning rate is estimated from only a few gradients and is very noisy; with "
            f"Transformers this early jolt can push training into a bad region it never leaves."
        ),
        remedy=(
            'Use RAdam (`TrainingArguments(optim="radam")` after `import hf_clinic`), which rectifies the adaptive '
            "learning rate until its variance is tractable, or add a learning-rate warmup (`warmup_steps`, e.g. 5-10% "
            "of training) so the first updates are small."
        ),
        evidence={"layer": layer, "ratio": ratio, **{k: v for k, v in context.items() if v is not None}},
    )


# ----------------------------------------------------------------------------------------------- clipping


def check_clip_saturation(
    history: Sequence[tuple[int, float, int]], step: int, thresholds: ClinicThresholds, context: Mapping | None = None
) -> Finding | None:
    """The `clip_saturation` signature from `(step, clip_rate, num_steps)` observations, oldest first.

    Each observation says that a fraction `clip_rate` of the `num_steps` optimizer steps ending at `step` were
    clipped. The rate is averaged (weighted by `num_steps`) over the most recent observations covering at least
    `thresholds.clip_window` steps; the finding fires when that average is ≥ `thresholds.clip_rate`.

    Args:
        context: optional `threshold` (clip threshold), `grad_norm` (typical pre-clip norm), `learning_rate`.
    """
    covered, clipped = 0, 0.0
    for _, rate, n in reversed(list(history)):
        if not math.isfinite(rate) or n <= 0:
            continue
        covered += n
        clipped += rate * n
        if covered >= thresholds.clip_window:
            break
    if covered < thresholds.clip_window:
        return None
    rate = clipped / covered
    if rate < thresholds.clip_rate:
        return None
    context = dict(context or {})
    threshold, norm, lr = context.get("threshold"), context.get("grad_norm"), context.get("learning_rate")
    detail = []
    if threshold is not None:
        detail.append(f"clip threshold {_fmt(float(threshold))}")
    if norm is not None:
        detail.append(f"typical pre-clip gradient norm {_fmt(float(norm))}")
    if lr is not None:
        detail.append(f"lr {_fmt(float(lr))}")
    detail_text = f" ({', '.join(detail)})" if detail else ""
    raise_to = f" to about the typical gradient norm ({_fmt(float(norm))})" if norm is not None else ""
    return Finding(
        code="clip_saturation",
        severity="warning",
        step=int(step),
        title=f"Gradient clipping fires on {100 * rate:.0f}% of steps",
        message=(
            f"Over the last {covered} optimizer steps, {100 * rate:.0f}% of the gradients were clipped{detail_text}. "
            f"When clipping fires on nearly every step, every update has the same length (learning rate x clip "
            f"threshold) whatever the gradient says: the clip threshold is too low for this learning rate, and the "
            f"learning-rate schedule no longer controls the step size."
        ),
        remedy=(
            f"Raise `max_grad_norm`{raise_to}, or lower the learning rate. To keep clipping adaptive, use "
            '`hf_clinic.ClipAwareCallback("step_length")` (threshold tied to the learning rate) or '
            '`ClipAwareCallback("zscore")` (clips only outliers).'
        ),
        evidence={"clip_rate": rate, "window": covered, **{k: v for k, v in context.items() if v is not None}},
    )


# ----------------------------------------------------------------------------------------------- NaN / inf


def check_non_finite(logs: Mapping, step: int) -> Finding | None:
    """The `non_finite` signature: a NaN or infinite `loss` or `grad_norm` in a training log."""
    bad = {}
    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(float(value)):
            bad[key] = float(value)
    if not bad:
        return None
    what = " and ".join(f"the {'loss' if k == 'loss' else 'gradient norm'} ({v})" for k, v in bad.items())
    return Finding(
        code="non_finite",
        severity="error",
        step=int(step),
        title=f"Training diverged: non-finite {' and '.join(bad)} at step {step}",
        message=(
            f"At step {step} {what} stopped being a finite number. The updates from here on are garbage; the run "
            f"has diverged."
        ),
        remedy=(
            'Lower the learning rate; add warmup or use RAdam (`optim="radam"`); enable gradient clipping '
            '(`max_grad_norm=1.0`, or `ClipAwareCallback("zscore")`); for a deep Post-LN model, add '
            "`AdminCallback()`. Under fp16, prefer bf16."
        ),
        evidence={k: str(v) for k, v in bad.items()},
    )
