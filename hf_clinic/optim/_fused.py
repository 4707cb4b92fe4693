"""The fused path shared by every hf-clinic optimizer: compiled per-tensor kernels for large tensors.

Why per-tensor kernels: on CPU the `torch._foreach_*` path allocates full-size temporaries for every intermediate
(sqrt(v), m̂, the update), which costs more than the arithmetic; a `torch.compile`d kernel over one flattened tensor
reads and writes each buffer once, in cache-sized blocks, like `torch.optim.AdamW(fused=True)`. On CUDA the same
kernels compile to Triton.

How:
- RAdam needs no compiler at all: a rectified step is an Adam(W) step with a rescaled step size, which ATen's fused
  Adam(W) kernels run in one call for every same-dtype tensor (see `_radam_aten`); only bf16/fp16 parameters with
  float32 state use a compiled kernel;
- each other algorithm has one kernel over `.view(-1)` tensors, compiled once per process with
  `torch.compile(dynamic=True, fullgraph=True)` and cached at module level (`_KERNELS`); every hyper-parameter
  (lr, bias corrections, ρ_t, switches such as Nesterov or LARS's trust norm) is passed in one small tensor, so
  nothing recompiles as a schedule moves; a new graph is built only for a new dtype combination or a new rank of
  the tensors' base (a 1-d vs a 2-d parameter);
- tensors with fewer than `FUSED_MIN_NUMEL` elements, non-contiguous tensors and RAdam's warm-phase steps go through
  the algorithm's foreach path: for them one kernel call (~25 µs of guard checks) costs more than the work;
- LAMB and LARS need per-tensor norms before the update: a reduction pass (LAMB: moments and the norms of θ and
  u; LARS: the norms of θ and g) then an apply pass that recomputes the update instead of storing it, so no
  temporary the size of the tensor is ever allocated (LAMB runs them as two kernels, see `_lamb_moments_kernel`);
- when compilation is unavailable or fails (no C++ compiler, unsupported platform), the optimizer warns once and
  uses its foreach path from then on: same maths, slower.

`fused=None` (the default of every optimizer) enables this path only where compilation pays for itself: see
`fused_by_default`.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


logger = logging.getLogger(__name__)

__all__ = [
    "FUSED_AUTO_MIN_NUMEL",
    "FUSED_MIN_NUMEL",
    "FusedFallbackWarning",
    "fused_by_default",
    "fused_gsignsgd",
    "fused_lamb",
    "fused_lars",
    "fused_radam",
    "radam_fused_by_default",
]

# Tensors with fewer elements take the foreach path inside a fused step (kernel-call overhead dominates below).
FUSED_MIN_NUMEL = 1 << 15
# `fused=None` turns the fused path on for a param group with at least this many elements in tensors of
# FUSED_MIN_NUMEL or more (BERT-base's decayed group: 85M). Below that, a cold compile (~10 s on a quiet 2-core
# machine, far more on a loaded one; ~1-3 s with inductor's on-disk cache) is not repaid within a short run, and
# the small models of test suites and CPU fine-tuning recipes (MiniLM: 22M) keep their zero start-up latency.
FUSED_AUTO_MIN_NUMEL = 50_000_000

_KERNELS: dict[str, Callable[..., Any]] = {}
_DISABLED: dict[str, str] = {}  # kernel name -> why compilation failed


class FusedFallbackWarning(UserWarning):
    """The fused (compiled) path is unavailable; the optimizer uses its foreach path instead."""


def _compile_supported() -> str | None:
    """Why torch.compile cannot be used here, or None."""
    if os.environ.get("HF_CLINIC_DISABLE_FUSED", "0") not in ("", "0"):
        return "HF_CLINIC_DISABLE_FUSED is set"
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        importlib.import_module("torch._dynamo")
    except Exception as err:  # pragma: no cover - platform dependent
        return f"torch._dynamo is unavailable ({err})"
    return None


def fused_by_default(params: Sequence[Tensor]) -> bool:
    """What `fused=None` means: True when compiled kernels are available and pay off for this param group.

    That is: `torch.compile` is usable (and not disabled with `HF_CLINIC_DISABLE_FUSED=1`), we are not already
    inside a compiled region, and the group has at least `FUSED_AUTO_MIN_NUMEL` (50M) elements in tensors of
    `FUSED_MIN_NUMEL` (32k) elements or more. BERT-base's decayed group qualifies (compile ~10 s cold, ~1-3 s with
    a warm inductor cache, repaid within ~100 steps); MiniLM-sized and test-sized models never compile. Pass
    `fused=True` or `fused=False` to decide yourself.
    """
    if torch.compiler.is_compiling() or _compile_supported() is not None:
        return False
    large = sum(p.numel() for p in params if p.numel() >= FUSED_MIN_NUMEL)
    return large >= FUSED_AUTO_MIN_NUMEL


def radam_fused_by_default(params: Sequence[Tensor]) -> bool:
    """RAdam's `fused=None`: its fused path needs no compilation when every parameter keeps state of its own dtype
    (float32/float64) on a device with ATen fused Adam kernels, so it is on for any size; otherwise as
    `fused_by_default`."""
    if torch.compiler.is_compiling() or os.environ.get("HF_CLINIC_DISABLE_FUSED", "0") not in ("", "0"):
        return False
    if hasattr(torch, "_fused_adamw_") and all(
        p.dtype in (torch.float32, torch.float64) and p.device.type in _get_fused_kernels_supported_devices()
        for p in params
    ):
        return True
    return fused_by_default(params)


def _kernel(name: str, fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """The compiled `fn`, cached per process; None when compilation is unavailable (after one warning)."""
    if name in _DISABLED:
        return None
    compiled = _KERNELS.get(name)
    if compiled is None:
        reason = _compile_supported()
        if reason is not None:
            _disable(name, reason)
            return None
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        _KERNELS[name] = compiled
    return compiled


def _disable(name: str, reason: str) -> None:
    first = not _DISABLED
    _DISABLED[name] = reason
    if not first:  # one warning per process: the cause (toolchain, platform) is almost always shared
        logger.info("hf_clinic fused %s kernel unavailable (%s); using foreach", name, reason)
        return
    warnings.warn(
        f"hf_clinic fused {name} kernel unavailable ({reason}); using the foreach implementation instead "
        f"(same results, slower). Pass fused=False to silence this warning.",
        FusedFallbackWarning,
        stacklevel=4,
    )


def _run(name: str, fn: Callable[..., Any], *args: Tensor) -> Any:
    """Run the compiled kernel; on a compilation failure warn once and run the eager kernel (same maths)."""
    if torch.compiler.is_compiling():
        return fn(*args)  # already being traced by an outer torch.compile: let it inline the kernel
    compiled = _kernel(name, fn)
    if compiled is None:
        return fn(*args)
    try:
        return compiled(*args)
    except torch.OutOfMemoryError:
        raise  # a run-time failure, not a compilation one: the kernel may have written part of its outputs
    except Exception as err:  # compilation errors surface on the first call with a new signature, before any write
        logger.debug("hf_clinic: compiling the %s kernel failed", name, exc_info=True)
        _KERNELS.pop(name, None)
        _disable(name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return fn(*args)


def _split(
    kernels: Sequence[str], params: Sequence[Tensor], *others: Sequence[Tensor] | None
) -> tuple[list[int], list[int]]:
    """Indices of tensors for the compiled kernels (large, contiguous, kernels available) and for foreach."""
    if any(name in _DISABLED for name in kernels):
        return [], list(range(len(params)))
    big, small = [], []
    for i, p in enumerate(params):
        ok = p.numel() >= FUSED_MIN_NUMEL and p.is_contiguous()
        ok = ok and all(o is None or o[i].is_contiguous() for o in others)
        (big if ok else small).append(i)
    return big, small


def _take(seq: Sequence[Any] | None, indices: Sequence[int]) -> list[Any] | None:
    return None if seq is None else [seq[i] for i in indices]


def _scalars(values: Sequence[float], like: Tensor) -> Tensor:
    """Hyper-parameters as one small tensor on the state's device/dtype (no recompilation when they change)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _flat(*tensors: Tensor) -> list[Tensor]:
    return [t.view(-1) for t in tensors]


def _norm(x: Tensor) -> Tensor:
    """‖x‖ inside a kernel. On CPU, float32 sums accumulate in float64: inductor's float32 reduction uses a
    cascade-sum helper that runs at about half the speed (measured: 1.6 ms vs 1.1 ms on 2.4M elements)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.linalg.vector_norm(x, dtype=torch.float64)
    return torch.linalg.vector_norm(x)


# ------------------------------------------------------------------------------------------------ RAdam


def _radam_kernel(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: Tensor) -> None:
    """A rectified RAdam step (the warm phase runs on foreach)."""
    # s = [sign, coupled wd, decoupled decay factor, 1-β1, β2, 1-β2, eps, -step size (lr·r_t·sqrt(bc2)/bc1)]
    theta = param.to(exp_avg.dtype)
    g = grad.to(exp_avg.dtype) * s[0] + s[1] * theta
    m = exp_avg + s[3] * (g - exp_avg)  # lerp's formula for weights < 0.5, without its branch
    v = exp_avg_sq * s[4] + s[5] * (g * g)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(theta * s[2] + s[7] * m / (v.sqrt() + s[6]))


# A rectified RAdam step is an Adam(W) step with step size lr·r_t·sqrt(1−β2^t)/(1−β1^t) on the *uncorrected*
# moments: ATen's fused Adam/AdamW kernels (`torch._fused_adamw_`, CPU and CUDA) compute exactly that when given a
# step count so large that their own bias corrections are 1, and they read and write each buffer once, without
# compilation. They never write into the gradients (no grad_scale is passed). Low-precision parameters with float32
# state (which those kernels refuse) take the compiled `_radam_kernel`.
_HUGE_STEP = 2.0**100  # β^step underflows to 0 for every β < 1: ATen's bias corrections become exactly 1
_HUGE_STEPS: dict[torch.device, Tensor] = {}


def _huge_step(device: torch.device) -> Tensor:
    step = _HUGE_STEPS.get(device)
    if step is None:
        step = _HUGE_STEPS[device] = torch.tensor(_HUGE_STEP, dtype=torch.float32, device=device)
    return step


def _aten_fused_adam_ok(param: Tensor, grad: Tensor, exp_avg: Tensor) -> bool:
    return (
        hasattr(torch, "_fused_adamw_")
        and param.device.type in _get_fused_kernels_supported_devices()
        and param.dtype == exp_avg.dtype == grad.dtype
        and param.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    )


def fused_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    multi_tensor: Callable[..., None],
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    rectify_threshold: float,
    warm_phase: str,
    maximize: bool,
) -> None:
    from .radam import rectification

    hyper = dict(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        decoupled_weight_decay=decoupled_weight_decay,
        rectify_threshold=rectify_threshold,
        warm_phase=warm_phase,
        maximize=maximize,
    )
    # rectification of the coming step, once per distinct step count
    steps = [step.item() + 1 for step in state_steps]
    by_step = {t: rectification(t, beta2, rectify_threshold)[1] for t in set(steps)}
    rects = [by_step[t] for t in steps]
    # rectified steps of same-dtype tensors -> ATen's fused Adam(W), whatever their size
    aten = [i for i, r in enumerate(rects) if r is not None and _aten_fused_adam_ok(params[i], grads[i], exp_avgs[i])]
    in_aten = set(aten)
    rest = [i for i in range(len(params)) if i not in in_aten]
    # rectified steps of large low-precision tensors (bf16/fp16 params, fp32 state) -> the compiled kernel
    big, _ = _split(("radam",), *(_take(x, rest) for x in (params, grads, exp_avgs, exp_avg_sqs)))
    big = [rest[j] for j in big if rects[rest[j]] is not None]
    small = sorted(set(rest) - set(big))
    # warm phase and small leftovers -> foreach
    if small:
        multi_tensor(*(_take(x, small) for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)), **hyper)
    rectified = aten + big
    if not rectified:
        return
    torch._foreach_add_(_take(state_steps, rectified), 1.0)
    if aten:
        _radam_aten(params, grads, exp_avgs, exp_avg_sqs, state_steps, aten, rects, **hyper)
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    decay = 1 - lr * weight_decay if decoupled_weight_decay else 1.0
    cache: dict[tuple, Tensor] = {}
    for i in big:
        step = state_steps[i].item()
        key = (step, exp_avgs[i].dtype, exp_avgs[i].device)
        if key not in cache:
            step_size = lr * rects[i] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            cache[key] = _scalars(
                (-1.0 if maximize else 1.0, coupled, decay, 1 - beta1, beta2, 1 - beta2, eps, -step_size), exp_avgs[i]
            )
        _run("radam", _radam_kernel, *_flat(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]), cache[key])


def _radam_aten(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    indices,
    rects,
    *,
    beta1,
    beta2,
    lr,
    weight_decay,
    eps,
    decoupled_weight_decay,
    maximize,
    **_,
) -> None:
    """Rectified RAdam steps with ATen's fused Adam(W): one call per (device, dtype, step)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((params[i].device, params[i].dtype, state_steps[i].item()), []).append(i)
    for (device, _, step), group in groups.items():
        step_size = lr * rects[group[0]] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if decoupled_weight_decay:
            # AdamW decays by (1 - lr_f·wd_f): keep lr·λ, the official code's decay
            fused, wd = torch._fused_adamw_, (lr * weight_decay / step_size if step_size > 0 else 0.0)
        else:
            fused, wd = torch._fused_adam_, weight_decay
        fused(
            _take(params, group),
            _take(grads, group),
            _take(exp_avgs, group),
            _take(exp_avg_sqs, group),
            [],
            [_huge_step(device)] * len(group),
            lr=step_size,
            beta1=beta1,
            beta2=beta2,
            weight_decay=wd,
            eps=eps,
            amsgrad=False,
            maximize=maximize,
        )


# ------------------------------------------------------------------------------------------------ LAMB


# LAMB runs as two kernels per tensor. Fused into one graph, inductor stores the update u in a fresh tensor-sized
# buffer between its reduction and its apply loop; on CPU a fresh buffer above glibc's mmap threshold (32 MiB: the
# embedding matrix) is page-faulted in on every step, which made the step 4x slower than AdamW. Recomputing u in
# the apply kernel costs the same memory traffic (read θ, m, v) with no temporary at all.


def _lamb_moments_kernel(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad_scale: Tensor, s: Tensor
) -> Tensor:
    """Pass 1: update m and v, return the trust ratio ‖θ‖/‖u‖ (guarded, clamped; 1 when not adapted)."""
    # s = [sign, 1-β1, β2, 1-β2, 1/bc1, 1/sqrt(bc2), eps, coupled wd, decoupled decay factor,
    #      adapted (0/1), ratio lower bound, ratio upper bound, -lr * outer scale]
    theta = param.to(exp_avg.dtype) * s[8]
    g = grad.to(exp_avg.dtype) * (s[0] / grad_scale)
    exp_avg.add_(s[1] * (g - exp_avg))  # lerp's formula for weights < 0.5, without its branch
    exp_avg_sq.mul_(s[2]).add_(g * g * s[3])
    update = (exp_avg * s[4]) / (exp_avg_sq.sqrt() * s[5] + s[6]) + s[7] * theta
    param_norm = _norm(theta)
    update_norm = _norm(update)
    ratio = torch.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, 1.0).to(s.dtype)
    return torch.where(s[9] > 0, ratio.clamp(min=s[10], max=s[11]), 1.0)


def _lamb_apply_kernel(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ratio: Tensor, s: Tensor) -> None:
    """Pass 2: recompute u from the new moments and apply θ ← θ − lr·ratio·u."""
    theta = param.to(exp_avg.dtype) * s[8]
    update = (exp_avg * s[4]) / (exp_avg_sq.sqrt() * s[5] + s[6]) + s[7] * theta
    param.copy_(theta + (s[12] * ratio) * update)


def fused_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    multi_tensor: Callable[..., list[Tensor]],
    grad_scale: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    decoupled_weight_decay: bool,
    adapted: bool,
    trust_clip: float | None,
    ratio_clamp: tuple[float, float] | None,
    scale_outside_ratio: bool,
    maximize: bool,
) -> list[Tensor]:
    from .lamb import _step_scalars

    big, small = _split(("lamb_moments", "lamb_apply"), params, grads, exp_avgs, exp_avg_sqs)
    ratios: list[Tensor] = []
    if small:
        ratios += multi_tensor(
            *(_take(x, small) for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)),
            grad_scale=grad_scale,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            decoupled_weight_decay=decoupled_weight_decay,
            adapted=adapted,
            trust_clip=trust_clip,
            ratio_clamp=ratio_clamp,
            scale_outside_ratio=scale_outside_ratio,
            maximize=maximize,
        )
    if not big:
        return ratios
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    decay = 1 - lr * weight_decay if (decoupled_weight_decay and weight_decay != 0) else 1.0
    lower = ratio_clamp[0] if ratio_clamp is not None else 0.0
    upper = min(ratio_clamp[1] if ratio_clamp is not None else math.inf, trust_clip or math.inf)
    cache: dict[tuple, tuple[Tensor, Tensor]] = {}
    torch._foreach_add_(_take(state_steps, big), 1.0)
    for i in big:
        step = state_steps[i].item()
        state = exp_avgs[i]
        key = (step, state.dtype, state.device)
        if key not in cache:
            bc1, bc2_sqrt, outer = _step_scalars(step, beta1, beta2, bias_correction, scale_outside_ratio)
            s = _scalars(
                (
                    -1.0 if maximize else 1.0,
                    1 - beta1,
                    beta2,
                    1 - beta2,
                    1 / bc1,
                    1 / bc2_sqrt,
                    eps,
                    coupled,
                    decay,
                    1.0 if adapted else 0.0,
                    lower,
                    upper,
                    -lr * outer,
                ),
                state,
            )
            scale = (
                grad_scale.to(device=state.device, dtype=state.dtype)
                if grad_scale is not None
                else torch.ones((), dtype=state.dtype, device=state.device)
            )
            cache[key] = (scale, s)
        scale, s = cache[key]
        param, grad, exp_avg, exp_avg_sq = _flat(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])
        ratio = _run("lamb_moments", _lamb_moments_kernel, param, grad, exp_avg, exp_avg_sq, scale, s)
        _run("lamb_apply", _lamb_apply_kernel, param, exp_avg, exp_avg_sq, ratio, s)
        if adapted:
            ratios.append(ratio)
    return ratios


# ------------------------------------------------------------------------------------------------ LARS


# LARS runs as (1) the per-tensor norms of θ and g, computed for all large tensors at once with eager
# `torch._foreach_norm` (ATen's reduction is ~2x faster than inductor's on CPU), or with a compiled reduction for
# ‖g + λθ‖ (trust_norm="norm_of_sum", no temporary), (2) the local learning rates, vectorised over the list with
# the same `local_lr` as the other paths, (3) one compiled apply kernel per tensor.


def _lars_norm_of_sum_kernel(param: Tensor, grad: Tensor, s: Tensor) -> Tensor:
    """‖g + λθ‖ without materialising g + λθ; s = [sign, wd]."""
    return _norm(grad.to(s.dtype) * s[0] + s[1] * param.to(s.dtype))


def _lars_apply_kernel(param: Tensor, grad: Tensor, buf: Tensor, ratio: Tensor, s: Tensor) -> None:
    """buf ← μ·buf + (1−δ)·inner·λ_l·(g + λθ); θ ← θ + outer·(buf, or the Nesterov combination)."""
    # s = [sign, wd, lr inside momentum (lr or 1), momentum (0 on the first step), 1-dampening (1 on the first
    #      step), weights of the update and of the buffer in the step ((1, μ) with Nesterov, else (0, 1)), -outer lr]
    theta = param.to(buf.dtype)
    scaled = (grad.to(buf.dtype) * s[0] + s[1] * theta) * (ratio * s[2])
    new_buf = buf * s[3] + scaled * s[4]
    buf.copy_(new_buf)
    param.copy_(theta + s[7] * (s[5] * scaled + s[6] * new_buf))


def fused_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    multi_tensor: Callable[..., list[Tensor]],
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lr_in_momentum: bool,
    trust_norm: str,
    clip_mode: str | None,
    adapted: bool,
    maximize: bool,
) -> list[Tensor]:
    from .lars import local_lr

    hyper = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        lr_in_momentum=lr_in_momentum,
        trust_norm=trust_norm,
        clip_mode=clip_mode,
        adapted=adapted,
        maximize=maximize,
    )
    if momentum_buffers is None:  # no momentum: nothing to fuse beyond what foreach does
        return multi_tensor(params, grads, momentum_buffers, state_steps, **hyper)
    kernels = ("lars_apply", "lars_norm_of_sum") if trust_norm == "norm_of_sum" else ("lars_apply",)
    big, small = _split(kernels, params, grads, momentum_buffers)
    ratios: list[Tensor] = []
    if small:
        ratios += multi_tensor(
            *(_take(x, small) for x in (params, grads, momentum_buffers, state_steps)),
            **hyper,
        )
    if not big:
        return ratios
    inner, outer = (lr, -1.0) if lr_in_momentum else (1.0, -lr)
    sign = -1.0 if maximize else 1.0
    torch._foreach_add_(_take(state_steps, big), 1.0)
    for indices in _group_by_state(big, momentum_buffers).values():
        buf0 = momentum_buffers[indices[0]]
        # 1-2. norms and local learning rates, vectorised over the group's tensors
        if adapted:
            thetas = [params[i] for i in indices]
            g = [grads[i] for i in indices]
            param_norm = torch.stack(torch._foreach_norm(thetas, 2, dtype=buf0.dtype))
            if trust_norm == "sum_of_norms":
                grad_norm = torch.stack(torch._foreach_norm(g, 2, dtype=buf0.dtype))
                denom = grad_norm + weight_decay * param_norm + eps
            else:
                s_norm = _scalars((sign, weight_decay), buf0)
                grad_norm = torch.stack(
                    [
                        _run("lars_norm_of_sum", _lars_norm_of_sum_kernel, *_flat(params[i], grads[i]), s_norm)
                        for i in indices
                    ]
                ).to(buf0.dtype)
                denom = grad_norm + eps
            ratio = local_lr(
                param_norm, grad_norm, denom, lr=lr, trust_coefficient=trust_coefficient, clip_mode=clip_mode
            )
            ratios.append(ratio)
            per_tensor = ratio.unbind(0)
        else:
            per_tensor = [torch.ones((), dtype=buf0.dtype, device=buf0.device)] * len(indices)
        # 3. apply
        cache: dict[bool, Tensor] = {}
        for i, r in zip(indices, per_tensor, strict=True):
            first = state_steps[i].item() == 1
            if first not in cache:
                cache[first] = _scalars(
                    (
                        sign,
                        weight_decay,
                        inner,
                        0.0 if first else momentum,
                        1.0 if first else 1 - dampening,
                        1.0 if nesterov else 0.0,
                        momentum if nesterov else 1.0,
                        outer,
                    ),
                    buf0,
                )
            _run("lars_apply", _lars_apply_kernel, *_flat(params[i], grads[i], momentum_buffers[i]), r, cache[first])
    return ratios


def _group_by_state(indices: Sequence[int], states: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """`indices` grouped by the (device, dtype) of their state tensor (stacked norms need one of each)."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((states[i].device, states[i].dtype), []).append(i)
    return groups


# ------------------------------------------------------------------------------------------------ GSignSGD


def _gsignsgd_kernel(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: Tensor) -> None:
    """A Generalized SignSGD step: v tracks m², and a zero denominator (eps = 0, m = 0) gives a zero step."""
    # s = [sign, coupled wd, decoupled decay factor, 1-β1, β2, 1-β2, 1/sqrt(bc2), eps, -lr/bc1]
    theta = param.to(exp_avg.dtype)
    g = grad.to(exp_avg.dtype) * s[0] + s[1] * theta
    m = exp_avg + s[3] * (g - exp_avg)  # lerp's formula for weights < 0.5, without its branch
    v = exp_avg_sq * s[4] + s[5] * (m * m)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    denom = v.sqrt() * s[6] + s[7]
    param.copy_(theta * s[2] + s[8] * torch.where(denom > 0, m / denom, m.sign()))


def fused_gsignsgd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    multi_tensor: Callable[..., None],
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    bias_correction: bool,
    maximize: bool,
) -> None:
    from .gsignsgd import _bias_corrections

    big, small = _split(("gsignsgd",), params, grads, exp_avgs, exp_avg_sqs)
    if small:
        multi_tensor(
            *(_take(x, small) for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)),
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction,
            maximize=maximize,
        )
    if not big:
        return
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    decay = 1 - lr * weight_decay if decoupled_weight_decay else 1.0
    cache: dict[tuple, Tensor] = {}
    torch._foreach_add_(_take(state_steps, big), 1.0)
    for i in big:
        step = state_steps[i].item()
        key = (step, exp_avgs[i].dtype, exp_avgs[i].device)
        if key not in cache:
            bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2, bias_correction)
            cache[key] = _scalars(
                (-1.0 if maximize else 1.0, coupled, decay, 1 - beta1, beta2, 1 - beta2, 1 / bc2_sqrt, eps, -lr / bc1),
                exp_avgs[i],
            )
        _run("gsignsgd", _gsignsgd_kernel, *_flat(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]), cache[key])
