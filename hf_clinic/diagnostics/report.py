"""`hf-clinic report`: one self-contained HTML page that shows what went on in a Trainer run.

The page holds the plain-language findings (recorded by [`ClinicCallback`] and re-checked here with the same
signatures), a summary of the run, and matplotlib PNG plots embedded as `data:` URIs (the file can be mailed or
attached to an issue as is): loss, learning rate, gradient norm and clip rate, optimizer telemetry (LAMB/LARS trust
ratios, RAdam's ρ_t and rectification), Admin's ω, amplification and residual dependency per layer, and per-layer
update-to-weight ratios. A plot whose data the run does not have is replaced by a one-line note saying why.

matplotlib is needed (`pip install matplotlib`); it is imported only here, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable

from . import signatures
from .clinic_log import RunData, read_run
from .signatures import ClinicThresholds, Finding


__all__ = ["analyze_run", "render_report", "write_report"]

REPORT_NAME = "clinic_report.html"

# Okabe-Ito palette: distinguishable for colour-blind readers.
BLUE, ORANGE, GREEN, RED, PURPLE, SKY, YELLOW, GREY = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#7f7f7f",
)


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "hf-clinic report needs matplotlib for its plots: `pip install matplotlib` (or `pip install hf-clinic[clinic]`)."
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.figsize": (6.4, 3.7),
            "figure.dpi": 110,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.labelsize": 9.5,
            "xtick.labelsize": 8.5,
            "ytick.labelsize": 8.5,
            "legend.fontsize": 8,
            "legend.frameon": False,
            "font.family": "DejaVu Sans",
        }
    )
    return plt


# ------------------------------------------------------------------------------------------------ analysis


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def analyze_run(run: RunData, thresholds: ClinicThresholds | None = None) -> list[Finding]:
    """The findings of a run: every signature re-checked on the logged data, one finding per code (the earliest).

    With `thresholds=None` the run's own thresholds (recorded by the callback) are used, which reproduces the
    callback's live findings; findings the callback recorded but that cannot be re-derived from the logs are kept.
    With explicit thresholds only the re-check counts.
    """
    start = run.run_start
    explicit = thresholds is not None
    if thresholds is None:
        thresholds = ClinicThresholds.from_dict(start["thresholds"]) if start.get("thresholds") else ClinicThresholds()
    found: dict[str, Finding] = {}

    def add(finding: Finding | None):
        if finding is not None and finding.code not in found:
            found[finding.code] = finding

    for record in run.of_type("diagnostics"):
        add(
            signatures.check_amplification(
                record["amplification"], record.get("dependency"), record["step"], thresholds
            )
        )
    args = start.get("args", {})
    context = {k: args.get(k) for k in ("optimizer", "learning_rate", "warmup_steps")}
    for record in run.of_type("update_ratio"):
        add(signatures.check_update_spike(record.get("ratios", {}), record["step"], thresholds, context))
    history, norms, last = [], [], None
    max_norm = args.get("max_grad_norm") or 0.0
    for log in run.train_logs():
        step = int(log["step"])
        add(signatures.check_non_finite(log, step))
        threshold = None
        if _finite(log.get("clip/rate")):
            history.append((step, float(log["clip/rate"]), max(step - last, 1) if last is not None else max(step, 1)))
            threshold = log.get("clip/threshold")
        elif _finite(log.get("grad_norm")) and max_norm:
            history.append((step, 1.0 if float(log["grad_norm"]) > max_norm else 0.0, 1))
            threshold = max_norm
        last = step
        norm = log.get("clip/grad_norm", log.get("grad_norm"))
        if _finite(norm):
            norms.append(float(norm))
        if history and history[-1][0] == step:
            ctx = {
                "threshold": float(threshold) if _finite(threshold) else None,
                "grad_norm": statistics.median(norms[-thresholds.clip_window :]) if norms else None,
                "learning_rate": log.get("learning_rate"),
            }
            add(signatures.check_clip_saturation(history, step, thresholds, ctx))
    if not explicit:
        for record in run.of_type("finding"):
            add(Finding.from_dict(record))
    return sorted(found.values(), key=lambda f: (f.severity != "error", f.step))


# ------------------------------------------------------------------------------------------------ plots


def _series(logs: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for log in logs:
        value = log.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in log:
            xs.append(float(log["step"]))
            ys.append(float(value))
    return xs, ys


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _mark_findings(ax, findings: list[Finding]):
    for f in findings:
        ax.axvline(f.step, color=RED if f.severity == "error" else ORANGE, lw=1, ls=":", alpha=0.8)


class _Plot:
    """One report figure: a title, a caption, and PNG bytes or the reason there is none."""

    def __init__(
        self, key: str, title: str, caption: str, png: bytes | None = None, note: str | None = None, wide=False
    ):
        self.key, self.title, self.caption, self.png, self.note, self.wide = key, title, caption, png, note, wide


def _done(key: str, title: str, caption: str, fig) -> _Plot:
    wide = fig.get_size_inches()[0] > 7
    return _Plot(key, title, caption, _png(fig), wide=wide)


def _plot_loss(run: RunData, findings, plt) -> _Plot:
    caption = "Training loss (and evaluation loss when logged). Dotted lines mark the steps of the findings."
    xs, ys = _series(run.train_logs(), "loss")
    if not xs:
        return _Plot("loss", "Loss", caption, note="No training loss was logged.")
    fig, ax = plt.subplots()
    ax.plot(xs, ys, color=BLUE, lw=1.6, label="train loss")
    bad = [x for x, y in zip(xs, ys, strict=False) if not math.isfinite(y)]
    if bad:
        ax.scatter(bad, [0] * len(bad), marker="x", color=RED, label="NaN/inf", zorder=3)
    ex, ey = _series(run.eval_logs(), "eval_loss")
    if ex:
        ax.plot(ex, ey, color=ORANGE, lw=1.6, marker="o", ms=4, label="eval loss")
    _mark_findings(ax, findings)
    ax.set_xlabel("optimizer step")
    _steps_axis(ax)
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()
    return _done("loss", "Loss", caption, fig)


def _plot_lr(run: RunData, findings, plt) -> _Plot:
    caption = "Learning rate from the scheduler, per logged step."
    xs, ys = _series(run.train_logs(), "learning_rate")
    if not xs:
        return _Plot("lr", "Learning rate", caption, note="No learning rate was logged.")
    fig, ax = plt.subplots()
    ax.plot(xs, ys, color=GREEN, lw=1.8)
    ax.fill_between(xs, ys, color=GREEN, alpha=0.08)
    ax.set_xlabel("optimizer step")
    _steps_axis(ax)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("Learning rate")
    return _done("lr", "Learning rate", caption, fig)


def _plot_grad(run: RunData, findings, plt) -> _Plot:
    caption = (
        "Pre-clip global gradient norm against the clip threshold, and the fraction of steps clipped "
        "(right axis: ClipAwareCallback's clip/rate, else estimated from the logged norm and max_grad_norm)."
    )
    logs = run.train_logs()
    xs, ys = _series(logs, "clip/grad_norm")
    if not xs:
        xs, ys = _series(logs, "grad_norm")
    if not xs:
        return _Plot("grad", "Gradient norm and clipping", caption, note="No gradient norm was logged.")
    fig, ax = plt.subplots()
    positive = [y for y in ys if y > 0 and math.isfinite(y)]
    ax.plot(xs, [y if y > 0 and math.isfinite(y) else float("nan") for y in ys], color=BLUE, lw=1.4, label="grad norm")
    max_norm = run.run_start.get("args", {}).get("max_grad_norm")
    span = positive + ([max_norm] if max_norm else [])
    if span and max(span) / min(span) > 10:  # log scale only when it spans more than a decade
        ax.set_yscale("log")
    tx, ty = _series(logs, "clip/threshold")
    if tx:
        ax.plot(tx, ty, color=RED, lw=1.2, ls="--", label="clip threshold")
    elif max_norm:
        ax.axhline(max_norm, color=RED, lw=1.2, ls="--", label=f"max_grad_norm = {max_norm:g}")
    ax.set_xlabel("optimizer step")
    _steps_axis(ax)
    ax.set_ylabel("gradient norm")
    rx, ry = _series(logs, "clip/rate")
    if not rx and max_norm:
        rx = xs
        ry = [1.0 if y > max_norm else 0.0 for y in ys]
    if rx:
        ax2 = ax.twinx()
        ax2.plot(rx, ry, color=ORANGE, lw=1.2, alpha=0.85, drawstyle="steps-post", label="clip rate")
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_ylabel("clip rate", color=ORANGE)
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title("Gradient norm and clipping")
    return _done("grad", "Gradient norm and clipping", caption, fig)


def _plot_optimizer(run: RunData, findings, plt) -> _Plot:
    caption = (
        "The optimizer's own telemetry: LAMB/LARS layer-wise trust ratios (min-max band, median line) and RAdam's "
        "variance rectification (ρ_t, and the rectification term r_t; no update while ρ_t ≤ the threshold)."
    )
    logs = run.train_logs()
    trust = [p for p in ("lamb", "lars") if _series(logs, f"{p}/trust_ratio_median")[0]]
    radam = bool(_series(logs, "radam/rho_t")[0])
    if not trust and not radam:
        return _Plot(
            "optimizer",
            "Optimizer telemetry",
            caption,
            note="No optimizer telemetry in this run (it comes from hf-clinic's RAdam, LAMB and LARS).",
        )
    panels = len(trust) + (1 if radam else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 if panels == 1 else 13.0, 4.2), squeeze=False)
    axes = axes[0]
    i = 0
    for prefix in trust:
        ax = axes[i]
        i += 1
        x, lo = _series(logs, f"{prefix}/trust_ratio_min")
        _, hi = _series(logs, f"{prefix}/trust_ratio_max")
        mx, med = _series(logs, f"{prefix}/trust_ratio_median")
        if lo and hi and len(lo) == len(hi):
            ax.fill_between(x, lo, hi, color=SKY, alpha=0.35, label="min-max")
        ax.plot(mx, med, color=BLUE, lw=1.6, label="median")
        ax.set_yscale("log")
        ax.set_title(f"{prefix.upper()} trust ratio")
        ax.set_xlabel("optimizer step")
        _steps_axis(ax)
        ax.legend()
    if radam:
        ax = axes[i]
        x, rho = _series(logs, "radam/rho_t")
        ax.plot(x, rho, color=PURPLE, lw=1.6, label="ρ_t")
        ax.set_ylabel("ρ_t", color=PURPLE)
        ax.set_xlabel("optimizer step")
        _steps_axis(ax)
        rx, r = _series(logs, "radam/rectification")
        if rx:
            ax2 = ax.twinx()
            ax2.plot(rx, r, color=GREEN, lw=1.4, ls="--", label="r_t")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("rectification r_t", color=GREEN)
            ax2.grid(False)
            ax2.spines["right"].set_visible(True)
        ax.set_title("RAdam rectification")
    fig.tight_layout()
    return _done("optimizer", "Optimizer telemetry", caption, fig)


def _diagnostics(run: RunData) -> list[dict]:
    return [r for r in run.of_type("diagnostics") if r.get("amplification") and r.get("dependency")]


def _step_colors(plt, n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(0.1 + 0.8 * i / max(n - 1, 1)) for i in range(n)]


def _pick(records: list[dict], k: int = 5) -> list[dict]:
    if len(records) <= k:
        return records
    idx = sorted({round(i * (len(records) - 1) / (k - 1)) for i in range(k)})
    return [records[i] for i in idx]


def _site_x(sites: list[dict]) -> tuple[list[float], list[tuple[float, str]]]:
    """x positions for sites in forward order, with a gap between stacks, and stack labels."""
    xs, labels, offset, prev = [], [], 0, None
    for s in sites:
        if prev is not None and s["stack"] != prev:
            offset = xs[-1] + 1.5
            labels.append((offset, s["stack"]))
        elif prev is None:
            labels.append((1, s["stack"]))
        xs.append(offset + s["index"])
        prev = s["stack"]
    return xs, labels


def _plot_sites(ax, sites: list[dict], ys: list[float], **kwargs) -> None:
    """Plot per-site values, one line segment per stack (no line joins the encoder's top to the decoder's bottom)."""
    xs, _ = _site_x(sites)
    label = kwargs.pop("label", None)
    for stack in dict.fromkeys(s["stack"] for s in sites):
        idx = [i for i, s in enumerate(sites) if s["stack"] == stack]
        ax.plot([xs[i] for i in idx], [ys[i] for i in idx], label=label, **kwargs)
        label = None


def _steps_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_or_symlog(ax, values) -> None:
    """Log scale when every value is positive and finite, else symlog (zeros happen, e.g. skipped steps)."""
    finite = [v for v in values if _finite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=0.01)


def _plot_amplification(run: RunData, findings, thresholds: ClinicThresholds, plt) -> _Plot:
    caption = (
        "Left: amplification after each residual sublayer, ‖y(W+δ) − y(W)‖² / (‖y(W)‖² eps²) for a random relative "
        "weight perturbation δ of size eps; it grows linearly with depth when layers depend heavily on their residual "
        "branches (Post-LN), logarithmically for Pre-LN/Admin. Right: amplification of the model output over training."
    )
    diags = _diagnostics(run)
    if not diags:
        note = run.run_start.get("probe_off") or "No amplification measurement (run with ClinicCallback)."
        return _Plot("amplification", "Amplification per layer", caption, note=note)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13.0, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    chosen = _pick(diags)
    for record, color in zip(chosen, _step_colors(plt, len(chosen)), strict=False):
        sites = record["amplification"]["sites"]
        _, labels = _site_x(sites)
        ys = [s["amplification"] for s in sites]
        _plot_sites(ax, sites, ys, color=color, lw=1.6, marker="o", ms=2.5, label=f"step {record['step']}")
    for x, label in labels:
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color=GREY, va="top")
    _log_or_symlog(ax, [s["amplification"] for r in chosen for s in r["amplification"]["sites"]])
    ax.set_xlabel("residual sublayer (forward order)")
    ax.set_ylabel("amplification")
    ax.set_title("Amplification per layer")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.93))
    steps = [r["step"] for r in diags]
    for stack in diags[-1]["amplification"]["outputs"]:
        vals = [r["amplification"]["outputs"].get(stack, {}).get("amplification", float("nan")) for r in diags]
        ax2.plot(steps, vals, lw=1.6, marker="o", ms=3.5, label=f"{stack} output")
    ax2.axhline(thresholds.amplification, color=RED, ls="--", lw=1, label=f"threshold {thresholds.amplification:g}")
    _log_or_symlog(
        ax2,
        [v["amplification"] for r in diags for v in r["amplification"]["outputs"].values()]
        + [thresholds.amplification],
    )
    ax2.set_xlabel("optimizer step")
    _steps_axis(ax2)
    ax2.set_title("Output amplification")
    ax2.legend()
    fig.tight_layout()
    return _done("amplification", "Amplification per layer", caption, fig)


def _plot_dependency(run: RunData, findings, plt) -> _Plot:
    caption = (
        "Residual dependency β²ᵢ,ᵢ = Var[Fᵢ] / Var[bᵢ]: the share of each sublayer's output variance that comes from its "
        "residual branch. Dashed: 1/i, the profile of Pre-LN and of Admin at initialisation."
    )
    diags = _diagnostics(run)
    if not diags:
        note = run.run_start.get("probe_off") or "No residual-dependency measurement (run with ClinicCallback)."
        return _Plot("dependency", "Residual dependency per layer", caption, note=note)
    fig, ax = plt.subplots()
    chosen = _pick(diags)
    for record, color in zip(chosen, _step_colors(plt, len(chosen)), strict=False):
        sites = record["dependency"]["sites"]
        ys = [s["dependency"] for s in sites]
        _plot_sites(ax, sites, ys, color=color, lw=1.6, marker="o", ms=2.5, label=f"step {record['step']}")
    sites = diags[-1]["dependency"]["sites"]
    _, labels = _site_x(sites)
    _plot_sites(ax, sites, [1 / s["index"] for s in sites], color=GREY, ls="--", lw=1, label="1/i (Pre-LN, Admin)")
    for x, label in labels:
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color=GREY, va="top")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("residual sublayer (forward order)")
    ax.set_ylabel("β² (branch share)")
    ax.set_title("Residual dependency per layer")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return _done("dependency", "Residual dependency per layer", caption, fig)


def _plot_omega(run: RunData, findings, plt) -> _Plot:
    caption = "Admin's ω (T5: branch gain): mean and min-max over all elements during training, and per site."
    logs = run.train_logs()
    x, mean = _series(logs, "admin/omega_mean")
    diags = [r for r in _diagnostics(run) if any(s.get("omega") is not None for s in r["dependency"]["sites"])]
    if not x and not diags:
        return _Plot("omega", "Admin ω", caption, note="No Admin in this run (add AdminCallback() to compare).")
    panels = (1 if x else 0) + (1 if diags else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 if panels == 1 else 13.0, 4.2), squeeze=False)
    axes = list(axes[0])
    if x:
        ax = axes.pop(0)
        _, lo = _series(logs, "admin/omega_min")
        _, hi = _series(logs, "admin/omega_max")
        if lo and hi and len(lo) == len(hi) == len(x):
            ax.fill_between(x, lo, hi, color=SKY, alpha=0.35, label="min-max")
        ax.plot(x, mean, color=BLUE, lw=1.6, label="mean")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("optimizer step")
        _steps_axis(ax)
        ax.set_ylabel("ω", rotation=0, labelpad=12)
        ax.set_title("ω during training")
        ax.legend()
    if diags:
        ax = axes.pop(0)
        chosen = _pick(diags, 3)
        for record, color in zip(chosen, _step_colors(plt, len(chosen)), strict=False):
            sites = record["dependency"]["sites"]
            ys = [s["omega"] if s.get("omega") is not None else 1.0 for s in sites]
            _plot_sites(ax, sites, ys, color=color, lw=1.6, marker="o", ms=2.5, label=f"step {record['step']}")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("residual sublayer (forward order)")
        ax.set_ylabel("ω\n(site mean)", rotation=0, labelpad=28)
        ax.set_title("ω per site")
        ax.legend()
    fig.tight_layout()
    return _done("omega", "Admin ω", caption, fig)


def _plot_update_ratio(run: RunData, findings, thresholds: ClinicThresholds, plt) -> _Plot:
    caption = (
        "Per-layer update-to-weight ratio ‖ΔW‖/‖W‖ of single optimizer steps (matrices only). Left: every layer "
        "(colour, log scale). Right: largest and median layer, with the spike threshold over the first steps (shaded)."
    )
    records = run.of_type("update_ratio")
    if not records:
        return _Plot(
            "update_ratio",
            "Update-to-weight ratios",
            caption,
            note="No update ratios measured (run with ClinicCallback).",
        )
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = list(dict.fromkeys(k for r in records for k in r["ratios"]))
    steps = [r["step"] for r in records]
    grid = np.full((len(layers), len(records)), np.nan)
    for j, r in enumerate(records):
        for i, layer in enumerate(layers):
            v = r["ratios"].get(layer)
            if _finite(v) and v > 0:
                grid[i, j] = v
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13.0, max(4.4, 0.16 * len(layers) + 1.6)), gridspec_kw={"width_ratios": [1.5, 1]}
    )
    finite = grid[np.isfinite(grid)]
    if finite.size:
        norm = LogNorm(vmin=max(finite.min(), 1e-8), vmax=max(finite.max(), finite.min() * 10))
        mesh = ax.imshow(grid, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
        fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02, label="‖ΔW‖/‖W‖")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7 if len(layers) > 16 else 8)
    ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(len(steps) // 6, 1))})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[t]) for t in ticks])
    ax.set_xlabel("optimizer step (measured steps)")
    ax.grid(False)
    ax.set_title("Update-to-weight ratio per layer")
    maxes = [np.nanmax(grid[:, j]) if np.isfinite(grid[:, j]).any() else np.nan for j in range(len(steps))]
    meds = [np.nanmedian(grid[:, j]) if np.isfinite(grid[:, j]).any() else np.nan for j in range(len(steps))]
    ax2.axvspan(0, thresholds.early_steps, color=ORANGE, alpha=0.12, label=f"first {thresholds.early_steps} steps")
    ax2.plot(steps, maxes, color=RED, lw=1.5, marker="o", ms=3, label="largest layer")
    ax2.plot(steps, meds, color=BLUE, lw=1.5, marker="o", ms=3, label="median layer")
    ax2.axhline(
        thresholds.update_ratio, color=ORANGE, ls="--", lw=1, label=f"spike threshold {thresholds.update_ratio:g}"
    )
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    _steps_axis(ax2)
    ax2.set_title("Largest and median layer")
    ax2.legend()
    fig.tight_layout()
    return _done("update_ratio", "Update-to-weight ratios", caption, fig)


# ------------------------------------------------------------------------------------------------ HTML


_CSS = """
:root { --ink:#1d2433; --muted:#5b6475; --line:#e3e7ee; --bg:#f5f7fb; --card:#fff; --warn:#b76e00; --warnbg:#fff6e5;
        --err:#b3261e; --errbg:#fdecea; --ok:#1b7f4b; --okbg:#e8f6ee; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", "DejaVu Sans", Roboto, Helvetica, Arial, sans-serif;
       color:var(--ink); background:var(--bg); line-height:1.45; }
header { background: linear-gradient(120deg, #0b3d5c, #0072B2); color:#fff; padding:26px 40px 22px; }
header h1 { margin:0 0 4px; font-size:26px; letter-spacing:0.2px; }
header .sub { opacity:0.85; font-size:14px; }
main { max-width: 1260px; margin: 0 auto; padding: 22px 28px 40px; }
h2 { font-size:18px; margin:28px 0 12px; }
.cards { display:grid; grid-template-columns: repeat(auto-fit, minmax(128px, 1fr)); gap:12px; margin-top:-38px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px;
        box-shadow:0 1px 3px rgba(20,30,60,.06); }
.card .k { font-size:11.5px; color:var(--muted); text-transform:uppercase; letter-spacing:.6px; }
.card .v { font-size:18px; font-weight:600; margin-top:2px; overflow-wrap:anywhere; }
.finding { border-radius:10px; padding:14px 18px; margin:10px 0; border:1px solid; }
.finding.warning { background:var(--warnbg); border-color:#f3d39a; }
.finding.error { background:var(--errbg); border-color:#f2b8b5; }
.finding.ok { background:var(--okbg); border-color:#a9dcc0; }
.finding h3 { margin:0 0 6px; font-size:15.5px; }
.finding.warning h3 { color:var(--warn); } .finding.error h3 { color:var(--err); } .finding.ok h3 { color:var(--ok); }
.finding p { margin:4px 0; font-size:14px; }
.finding .remedy { margin-top:8px; padding-top:8px; border-top:1px dashed rgba(0,0,0,.15); }
.badge { display:inline-block; font-size:11px; font-weight:700; padding:2px 8px; border-radius:20px; margin-right:8px;
         vertical-align:2px; color:#fff; }
.warning .badge { background:#d98a00; } .error .badge { background:#c62828; } .ok .badge { background:#2e9d63; }
code { background:rgba(0,0,0,.06); padding:1px 5px; border-radius:4px; font-size:12.5px; }
.grid { display:grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap:16px; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px 10px;
         box-shadow:0 1px 3px rgba(20,30,60,.06); }
figure.wide { grid-column: 1 / -1; }
figure img { width:100%; height:auto; display:block; }
figure.single img { max-width:620px; margin:0 auto; }
figure.single figcaption { max-width:620px; margin:6px auto 0; }
figcaption { font-size:12.5px; color:var(--muted); margin-top:6px; }
.notes { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 16px; margin-top:16px;
         color:var(--muted); font-size:13px; }
.notes ul { margin:6px 0 2px; padding-left:20px; }
footer { color:var(--muted); font-size:12px; margin-top:30px; border-top:1px solid var(--line); padding-top:12px; }
"""


def _md(text: str) -> str:
    """HTML-escape `text`, turning `backticks` into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _summary_cards(run: RunData, findings: list[Finding]) -> list[tuple[str, str]]:
    start, logs = run.run_start, run.train_logs()
    args = start.get("args", {})
    _, losses = _series(logs, "loss")
    steps = max([int(h["step"]) for h in run.log_history if "step" in h] + [r["step"] for r in run.records] + [0])
    cards = [("Model", start.get("model_type") or "unknown")]
    if start.get("num_parameters"):
        cards.append(("Parameters", f"{start['num_parameters'] / 1e6:.1f} M"))
    if start.get("sites"):
        stacks = {}
        for s in start["sites"]:
            stacks[s["stack"]] = stacks.get(s["stack"], 0) + 1
        cards.append(("Residual sublayers", " + ".join(f"{n} {k[:3]}" for k, n in stacks.items())))
    cards.append(("Optimizer steps", str(steps)))
    if args.get("optimizer") or args.get("optim"):
        cards.append(("Optimizer", str(args.get("optimizer") or args.get("optim"))))
    if args.get("learning_rate") is not None:
        cards.append(("Peak lr", f"{args['learning_rate']:.3g}"))
    if losses:
        finite = [x for x in losses if math.isfinite(x)]
        cards.append(("Loss", f"{finite[0]:.3g} → {losses[-1]:.3g}" if finite else "NaN"))
    n_err = sum(f.severity == "error" for f in findings)
    cards.append(("Findings", f"{len(findings)}" + (f" ({n_err} error)" if n_err else "")))
    return cards


def render_report(
    run: RunData,
    *,
    thresholds: ClinicThresholds | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[str, list[_Plot], list[Finding]]:
    """Build the report page of `run`: `(html, plots, findings)`. `progress` wraps the plot loop (a tqdm)."""
    plt = _pyplot()
    if thresholds is None:
        start = run.run_start
        thresholds = ClinicThresholds.from_dict(start["thresholds"]) if start.get("thresholds") else ClinicThresholds()
    findings = analyze_run(run, thresholds)
    makers = [
        lambda: _plot_loss(run, findings, plt),
        lambda: _plot_lr(run, findings, plt),
        lambda: _plot_grad(run, findings, plt),
        lambda: _plot_optimizer(run, findings, plt),
        lambda: _plot_amplification(run, findings, thresholds, plt),
        lambda: _plot_dependency(run, findings, plt),
        lambda: _plot_omega(run, findings, plt),
        lambda: _plot_update_ratio(run, findings, thresholds, plt),
    ]
    iterator = progress(makers) if progress else makers
    plots = [make() for make in iterator]

    title = os.path.basename(os.path.abspath(run.run_dir)) or run.run_dir
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>hf-clinic report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>Training clinic: {html.escape(title)}</h1>",
        f"<div class='sub'>hf-clinic report · {html.escape(os.path.abspath(run.run_dir))} · generated "
        f"{time.strftime('%Y-%m-%d %H:%M')}</div></header><main>",
        "<div class='cards'>",
    ]
    for k, v in _summary_cards(run, findings):
        out.append(
            f"<div class='card'><div class='k'>{html.escape(k)}</div><div class='v'>{html.escape(v)}</div></div>"
        )
    out.append("</div><h2>Findings</h2>")
    if findings:
        for f in findings:
            out.append(
                f"<div class='finding {f.severity}'><h3><span class='badge'>{f.severity.upper()}</span>"
                f"{_md(f.title)}</h3><p>{_md(f.message)}</p>"
                f"<p class='remedy'><b>What to do:</b> {_md(f.remedy)}</p></div>"
            )
    else:
        checked = "amplification with depth, early update spikes, clip saturation, non-finite loss"
        out.append(
            "<div class='finding ok'><h3><span class='badge'>OK</span>No known failure signature</h3>"
            f"<p>Checked: {checked}. Thresholds: {_md(', '.join(f'`{k}={v}`' for k, v in thresholds.to_dict().items()))}.</p></div>"
        )
    out.append("<h2>Plots</h2><div class='grid'>")
    # Half-width figures first, in pairs, then the wide ones; an odd one out is centred on its own row.
    halves = [p for p in plots if p.png and not p.wide]
    shown = halves + [p for p in plots if p.png and p.wide]
    odd_one = halves[-1] if len(halves) % 2 else None
    for p in shown:
        cls = " class='wide'" if p.wide else (" class='wide single'" if p is odd_one else "")
        uri = "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
        out.append(
            f"<figure id='{p.key}'{cls}><img alt='{html.escape(p.title)}' src='{uri}'>"
            f"<figcaption>{_md(p.caption)}</figcaption></figure>"
        )
    out.append("</div>")
    missing = [p for p in plots if not p.png]
    if missing:
        items = "".join(f"<li><b>{html.escape(p.title)}</b>: {_md(p.note or '')}</li>" for p in missing)
        out.append(f"<div class='notes'>Not in this run:<ul>{items}</ul></div>")
    sources = [s for s in (run.trainer_state_path, run.clinic_log_path) if s]
    out.append(
        "<footer>Definitions: amplification and residual dependency follow Liu et al., <i>Understanding the Difficulty "
        "of Training Transformers</i> (EMNLP 2020, arXiv:2004.08249); see <code>hf_clinic.diagnostics</code>. "
        f"Sources: {_md(', '.join(f'`{s}`' for s in sources))}.</footer></main></body></html>"
    )
    return "".join(out), plots, findings


def write_report(
    run_dir: str,
    output: str | None = None,
    *,
    thresholds: ClinicThresholds | None = None,
    images_dir: str | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> str:
    """Write the HTML report of a Trainer output directory and return its path.

    Args:
        run_dir (`str`): the Trainer's `output_dir` (with `trainer_state.json` and/or `clinic_log.jsonl`).
        output (`str`, *optional*): the HTML path; defaults to `<run_dir>/clinic_report.html`.
        thresholds ([`ClinicThresholds`], *optional*): re-check signatures with these instead of the run's own.
        images_dir (`str`, *optional*): also write every plot there as `<name>.png`.
        progress (`callable`, *optional*): wraps the plot loop, e.g. `tqdm`.

    Raises:
        `FileNotFoundError`: missing run directory or nothing to read in it. [`ClinicLogError`]: corrupt logs.
    """
    run = read_run(run_dir)
    page, plots, _ = render_report(run, thresholds=thresholds, progress=progress)
    output = output or os.path.join(run_dir, REPORT_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    if images_dir:
        os.makedirs(images_dir, exist_ok=True)
        for p in plots:
            if p.png:
                with open(os.path.join(images_dir, f"{p.key}.png"), "wb") as f:
                    f.write(p.png)
    return output
