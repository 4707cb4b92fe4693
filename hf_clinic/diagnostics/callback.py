"""`ClinicCallback`: watch a `transformers.Trainer` run for the known ways Transformer training goes wrong.

What it measures, and when (optimizer steps; `t` = `state.global_step`, the number of completed steps):

* **Amplification and residual dependency** ([`probe`]: two eval-mode forward passes on a small fixed probe batch):
  before the first update (t = 0), every `every` steps, and at the end of training. Measured in
  `on_pre_optimizer_step`, i.e. on the weights W_t before step t+1 is applied.
* **Per-layer update-to-weight ratios** ‖W_{t+1} − W_t‖ / ‖W_t‖ over each layer's matrices: at every step during
  the first `thresholds.early_steps` steps (where the early-update signature lives), then every
  `update_ratio_every` steps. The weights are copied in `on_pre_optimizer_step` and compared in
  `on_optimizer_step`, only on those steps.
* **Optimizer telemetry and clip statistics**: read from the Trainer's own training logs, which already carry RAdam's
  `radam/rho_t` and `radam/rectification`, LAMB/LARS `*/trust_ratio_min|median|max`, and `ClipAwareCallback`'s
  `clip/*` (all added by `hf_clinic.MetricsCallback` contributions); without `ClipAwareCallback` the clip rate is
  estimated from the logged pre-clip `grad_norm` against `max_grad_norm`, one step per log.

Where it goes: `clinic/*` scalars join the Trainer's training logs (so TensorBoard, W&B and `log_history` get them)
when a fresh measurement exists; every log, measurement and finding is also appended to
`<output_dir>/clinic_log.jsonl`, which `hf-clinic report <output_dir>` turns into an HTML page.

Findings: after each measurement the signatures of `hf_clinic.diagnostics.signatures` run; the first occurrence of
each is issued once as a [`ClinicWarning`] (and logged), written to the clinic log, and kept in
`callback.findings`.

Cost and side effects: the probe batch is a slice of the first training batch, captured by a one-shot forward
pre-hook on the model during the first training forward pass (no extra data loading, the dataloader is not
touched). Measurements never write to the weights, restore every module's train/eval flag, leave gradients and the
global RNG alone, and run only on the world process zero. Under DeepSpeed or FSDP (sharded parameters) the probe and
the update ratios are switched off and only logs are analysed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..integrations.trainer_logs import MetricsCallback, unwrap_optimizer
from . import signatures
from .clinic_log import LOG_NAME, ClinicLogWriter
from .measures import _Located, _measure, unwrap_model
from .signatures import ClinicThresholds, Finding


logger = logging.getLogger(__name__)

__all__ = ["ClinicCallback", "ClinicWarning", "layer_groups"]


class ClinicWarning(UserWarning):
    """A training-health finding from [`ClinicCallback`], with the remedy in the message."""


def layer_groups(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Trainable matrices (ndim ≥ 2, no `admin_omega`) grouped per layer, for update-to-weight ratios.

    Models in the Admin site table get one group per stack layer (`encoder.3`, `decoder.0`), plus `embeddings` and
    `other` (heads, pooler); other models are grouped by the name prefix up to the first numeric component.
    """
    model = unwrap_model(model)
    owner: dict[int, str] = {}
    try:
        located = _Located(model)
    except (ValueError, TypeError):
        located = None
    if located is not None:
        for stack, layers in located.stack_layers.items():
            for i, layer in enumerate(layers):
                for p in layer.parameters():
                    owner.setdefault(id(p), f"{stack}.{i}")
    groups: dict[str, list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad or p.ndim < 2 or name.endswith("admin_omega"):
            continue
        seen.add(id(p))
        group = owner.get(id(p))
        if group is None:
            if located is None:
                match = re.match(r"^(.*?\.\d+)\.", name)
                group = match.group(1) if match else ("embeddings" if "embed" in name else "other")
            else:
                group = "embeddings" if "embed" in name or "shared" in name.split(".") else "other"
        groups.setdefault(group, []).append((name, p))
    return list(groups.items())


class ClinicCallback(MetricsCallback):
    """Diagnose why a Transformer is hard to train, during training, and say which remedy fits.

    Add it to the Trainer, train, then run `hf-clinic report <output_dir>` for the plots. See the module docstring
    for what is measured when, and `hf_clinic.diagnostics.signatures` for the failure signatures and thresholds.

    Args:
        every (`int`, *optional*, defaults to `100`):
            Measure amplification and residual dependency every `every` optimizer steps (and before the first
            update and at the end). `0` switches the probe off.
        update_ratio_every (`int`, *optional*, defaults to `10`):
            Measure per-layer update-to-weight ratios every `update_ratio_every` steps after the first
            `thresholds.early_steps` steps (which are all measured). `0` switches update ratios off.
        probe_batch (`dict`, *optional*):
            The batch to probe with; by default the first `probe_size` examples of the first training batch.
        probe_size (`int`, *optional*, defaults to `8`): examples kept from the first training batch.
        eps (`float`, *optional*, defaults to `1e-3`): relative perturbation size (see `measure_amplification`).
        seed (`int`, *optional*, defaults to `0`): seed of the perturbation; the same δ at every measurement.
        thresholds ([`ClinicThresholds`] or `dict`, *optional*): the signature thresholds.
        log_file (`str`, *optional*, defaults to `"clinic_log.jsonl"`):
            Clinic log path, relative to `args.output_dir`; `None` disables the file.
        warn (`bool`, *optional*, defaults to `True`): issue a [`ClinicWarning`] for each new finding.
        enabled (`bool`, *optional*, defaults to `True`): `False` makes the callback a no-op (for A/B runs).

    Attributes:
        findings (`list[Finding]`): the findings so far, in order.
        timings (`dict[str, float]`): seconds spent in the callback, by activity (for overhead measurements).

    Logged metrics (training logs, when fresh): `clinic/amplification` (model output; `clinic/amplification_<stack>`
    per stack for encoder-decoder models), `clinic/dependency_mean|max` (β_{i,i}²), `clinic/update_ratio_max|median`
    (over layers), `clinic/findings` (count).

    Example:

    ```py
    >>> from hf_clinic import ClinicCallback
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[ClinicCallback()])
    >>> trainer.train()          # warns in plain language if it sees a known failure signature
    >>> # then, in a shell:  hf-clinic report out/
    ```

    References:
        Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249.
    """

    def __init__(
        self,
        *,
        every: int = 100,
        update_ratio_every: int = 10,
        probe_batch: Mapping | None = None,
        probe_size: int = 8,
        eps: float = 1e-3,
        seed: int = 0,
        thresholds: ClinicThresholds | Mapping | None = None,
        log_file: str | None = LOG_NAME,
        warn: bool = True,
        enabled: bool = True,
    ):
        for name, value in (("every", every), ("update_ratio_every", update_ratio_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 0 (0 switches it off)")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"Invalid probe_size: {probe_size!r}; expected a positive integer")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"Invalid eps: {eps!r}; expected a small positive float such as 1e-3")
        if probe_batch is not None and not hasattr(probe_batch, "items"):
            raise ValueError(f"Invalid probe_batch: expected a dict of tensors, got {type(probe_batch).__name__}")
        if thresholds is None:
            thresholds = ClinicThresholds()
        elif isinstance(thresholds, Mapping):
            thresholds = ClinicThresholds.from_dict(thresholds)
        elif not isinstance(thresholds, ClinicThresholds):
            raise ValueError(
                f"Invalid thresholds: expected ClinicThresholds or a dict, got {type(thresholds).__name__}"
            )
        self.every = every
        self.update_ratio_every = update_ratio_every
        self.probe_batch = dict(probe_batch) if probe_batch is not None else None
        self.probe_size = probe_size
        self.eps = float(eps)
        self.seed = int(seed)
        self.thresholds = thresholds
        self.log_file = log_file
        self.warn = warn
        self.enabled = enabled
        self.findings: list[Finding] = []
        self.timings: dict[str, float] = {"probe": 0.0, "update_ratio": 0.0, "logs": 0.0}
        self._reset_run_state()

    def _reset_run_state(self):
        self._model = None
        self._located = None
        self._probe_off_reason: str | None = None
        self._groups = None
        self._snapshot = None
        self._capture_handle = None
        self._writer: ClinicLogWriter | None = None
        self._pending: dict[str, float] = {}
        self._codes: set[str] = set()
        self._last_probe_step: int | None = None
        self._last_train_log_step: int | None = None
        self._clip_history: list[tuple[int, float, int]] = []
        self._clip_norms: list[float] = []
        self._context: dict = {}
        self._main = True
        self._active = False

    # ------------------------------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.enabled:
            return
        self._reset_run_state()
        self._active = True
        self._main = bool(state.is_world_process_zero)
        self._model = unwrap_model(model)
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            self._probe_off_reason = "parameters are sharded (DeepSpeed/FSDP); only the logs are analysed"
        else:
            try:
                self._located = _Located(self._model)
            except (ValueError, TypeError) as err:
                self._probe_off_reason = f"amplification and residual dependency are not available: {err}"
        if self._probe_off_reason:
            logger.warning("ClinicCallback: %s", self._probe_off_reason)
        inner = unwrap_optimizer(optimizer)
        self._context = {
            "optimizer": type(inner).__name__ if inner is not None else str(getattr(args, "optim", "")),
            "learning_rate": float(args.learning_rate),
            "warmup_steps": int(args.get_warmup_steps(state.max_steps)) if state.max_steps else None,
            "max_grad_norm": float(args.max_grad_norm) if args.max_grad_norm else 0.0,
        }
        if self._main and self.log_file:
            path = self.log_file if os.path.isabs(self.log_file) else os.path.join(args.output_dir, self.log_file)
            self._writer = ClinicLogWriter(path, fresh=state.global_step == 0)
            self._write(
                {
                    "type": "run_start",
                    "step": int(state.global_step),
                    "resumed_from": int(state.global_step),
                    "time": time.time(),
                    "model_type": getattr(getattr(self._model, "config", None), "model_type", None),
                    "model_class": type(self._model).__name__,
                    "num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "wiring": self._located.arch.wiring if self._located else None,
                    "sites": [
                        {"stack": s.stack, "index": s.index, "kind": s.kind, "name": s.norm_name}
                        for s in (self._located.sites if self._located else [])
                    ],
                    "probe_off": self._probe_off_reason,
                    "max_steps": int(state.max_steps or 0),
                    "train_batch_size": int(getattr(state, "train_batch_size", 0) or 0),
                    "args": {
                        "optim": str(getattr(args, "optim", "")),
                        "lr_scheduler_type": str(getattr(args, "lr_scheduler_type", "")),
                        **self._context,
                        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                        "per_device_train_batch_size": int(args.per_device_train_batch_size),
                        "weight_decay": float(args.weight_decay),
                    },
                    "cadence": {"every": self.every, "update_ratio_every": self.update_ratio_every},
                    "eps": self.eps,
                    "seed": self.seed,
                    "thresholds": self.thresholds.to_dict(),
                }
            )
        if self._main and self._located is not None and self.every and self.probe_batch is None:
            self._capture_handle = self._model.register_forward_pre_hook(self._capture_probe, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not (self.enabled and self._active and self._main):
            return
        t = int(state.global_step)
        if self.every and self._located is not None and (t % self.every == 0):
            self._run_probe(t)
        if self._wants_update_ratio(t + 1):
            start = time.perf_counter()
            if self._groups is None:
                self._groups = layer_groups(self._model)
            self._snapshot = [[p.detach().clone() for _, p in params] for _, params in self._groups]
            self.timings["update_ratio"] += time.perf_counter() - start

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not (self.enabled and self._active and self._main) or self._snapshot is None:
            return
        start = time.perf_counter()
        step = int(state.global_step) + 1
        ratios = {}
        with torch.no_grad():
            for (group, params), before in zip(self._groups, self._snapshot, strict=True):
                after = [p.detach() for _, p in params]
                diffs = torch._foreach_sub(after, before)
                num = math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(diffs)))
                den = math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(before)))
                ratios[group] = num / den if den > 0 else float("nan")
        self._snapshot = None
        finite = [v for v in ratios.values() if math.isfinite(v)]
        if finite:
            self._pending["clinic/update_ratio_max"] = max(finite)
            self._pending["clinic/update_ratio_median"] = statistics.median(finite)
        self._write({"type": "update_ratio", "step": step, "ratios": ratios})
        self.timings["update_ratio"] += time.perf_counter() - start
        self._report(signatures.check_update_spike(ratios, step, self.thresholds, self._context))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.enabled and self._active and self._main) or not logs:
            return
        start = time.perf_counter()
        step = int(state.global_step)
        self._write({"type": "log", "step": step, **{k: _plain(v) for k, v in logs.items()}})
        if "loss" in logs or "learning_rate" in logs:
            self._report(signatures.check_non_finite(logs, step))
            self._observe_clipping(logs, step)
            self._last_train_log_step = step
        self.timings["logs"] += time.perf_counter() - start

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.enabled and self._active):
            return
        self._remove_capture()
        t = int(state.global_step)
        if self._main and self.every and self._located is not None and self._last_probe_step != t:
            self._run_probe(t)
        self._write(
            {
                "type": "run_end",
                "step": t,
                "time": time.time(),
                "findings": len(self.findings),
                "timings": self.timings,
            }
        )
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._active = False

    def log_metrics(self, args, state) -> dict[str, float]:
        if not (self.enabled and self._active and self._main):
            return {}
        out, self._pending = self._pending, {}
        if out or self.findings:
            out["clinic/findings"] = float(len(self.findings))
        return out

    # ------------------------------------------------------------------------------------------ internals

    def _capture_probe(self, module, args, kwargs):
        batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        ids = batch.get("input_ids", batch.get("inputs_embeds"))
        if ids is None or ids.ndim == 0:
            return
        n = ids.shape[0]
        self.probe_batch = {
            k: v[: self.probe_size].detach().clone() for k, v in batch.items() if v.ndim >= 1 and v.shape[0] == n
        }
        self._remove_capture()

    def _remove_capture(self):
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def _wants_update_ratio(self, step: int) -> bool:
        if not self.update_ratio_every or self._probe_off_reason and "sharded" in self._probe_off_reason:
            return False
        return step <= self.thresholds.early_steps or step % self.update_ratio_every == 0

    def _run_probe(self, t: int) -> None:
        if self.probe_batch is None:
            return
        start = time.perf_counter()
        try:
            amplification, dependency = _measure(self._located, self.probe_batch, self.eps, self.seed, False, None)
        except Exception as err:  # never let a diagnostic kill a training run
            self._probe_off_reason = f"probe failed and was switched off: {type(err).__name__}: {err}"
            logger.warning("ClinicCallback: %s", self._probe_off_reason)
            self._located = None
            return
        finally:
            self.timings["probe"] += time.perf_counter() - start
        self._last_probe_step = t
        amp, dep = amplification.to_dict(), dependency.to_dict()
        self._pending.update(amplification.summary())
        self._pending.update(dependency.summary())
        self._write({"type": "diagnostics", "step": t, "amplification": amp, "dependency": dep})
        self._report(signatures.check_amplification(amp, dep, t, self.thresholds))

    def _observe_clipping(self, logs: Mapping, step: int) -> None:
        since = step - self._last_train_log_step if self._last_train_log_step is not None else step
        threshold = None
        if "clip/rate" in logs:
            rate, n = float(logs["clip/rate"]), max(int(since), 1)
            threshold = logs.get("clip/threshold")
        elif "grad_norm" in logs and self._context.get("max_grad_norm"):
            norm = float(logs["grad_norm"])
            if not math.isfinite(norm):
                return
            threshold = self._context["max_grad_norm"]
            rate, n = (1.0 if norm > threshold else 0.0), 1
        else:
            return
        norm = logs.get("clip/grad_norm", logs.get("grad_norm"))
        if isinstance(norm, (int, float)) and math.isfinite(float(norm)):
            self._clip_norms.append(float(norm))
        self._clip_history.append((step, rate, n))
        context = {
            "threshold": float(threshold) if isinstance(threshold, (int, float)) else None,
            "grad_norm": statistics.median(self._clip_norms[-self.thresholds.clip_window :])
            if self._clip_norms
            else None,
            "learning_rate": logs.get("learning_rate"),
        }
        self._report(signatures.check_clip_saturation(self._clip_history, step, self.thresholds, context))

    def _report(self, finding: Finding | None) -> None:
        if finding is None or finding.code in self._codes:
            return
        self._codes.add(finding.code)
        self.findings.append(finding)
        self._write({"type": "finding", **finding.to_dict()})
        logger.warning("%s", finding)
        if self.warn:
            warnings.warn(str(finding), ClinicWarning, stacklevel=2)

    def _write(self, record: dict) -> None:
        if self._writer is not None:
            self._writer.write(record)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
