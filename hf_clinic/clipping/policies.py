"""Clip policies: the rule that turns this step's pre-clip gradient norm into a clip threshold.

A policy is a small stateful object. [`ClipAwareSchedule`] calls it once per optimizer step with the finite
pre-clip global norm G_t and the scheduled learning rate eta_t; the policy returns the threshold c_t and the
schedule applies the coefficient min(1, c_t / (G_t + 1e-6)), exactly as `torch.nn.utils.clip_grad_norm_` does.
Non-finite norms never reach a policy: the schedule skips those steps, so no policy state is polluted by them.
The unit-wise policy (AGC) is the exception: it has no global threshold and clips the gradients itself.

| name          | rule                                                                                        |
|---------------|---------------------------------------------------------------------------------------------|
| `fixed`       | c_t = c (the Trainer's `max_grad_norm`, with telemetry)                                      |
| `step_length` | c_t = gamma / eta_t, so the SGD step length eta_t * ||g_t|| never exceeds gamma               |
| `percentile`  | c_t = p-th percentile of the last `history_size` norms, the current one included (AutoClip) |
| `zscore`      | EMA mean/variance of past norms; clip spikes whose z-score exceeds `z_thresh` (ZClip)        |
| `unitwise`    | per output unit: ||G_i|| <= clip_factor * max(||W_i||, eps) (AGC), final classifier excluded |

Policies are chosen by name through [`get_clip_policy`]; [`register_clip_policy`] adds user-defined ones.

NOTE: `zscore` follows the authors' code (bluorion-com/ZClip `zclip/zclip.py`): `clip_factor` multiplies the whole
adaptive threshold (their README says "multiplier for std"), the variance EMA uses the already-updated mean, and
the EMAs are fed the adaptive threshold on spike steps. When no spike is detected the threshold reported here is
`max_grad_norm` (or +inf) rather than the norm itself; the resulting clip coefficient is the same.

NOTE: `percentile` keeps a bounded history (AutoClip keeps all norms); `history_size=None` restores the paper's rule.
Percentiles interpolate linearly between order statistics, like `numpy.percentile`'s default.

References:
    - Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a theoretical justification for
      adaptivity", ICLR 2020, arXiv:1905.11881.
    - Zhang, Jin, Fang, Wang, "Improved analysis of clipping algorithms for non-convex optimization",
      NeurIPS 2020, arXiv:2010.02519.
    - Liu, Zhuang, Lei, Liao, "A communication-efficient distributed gradient clipping algorithm for training deep
      neural networks", NeurIPS 2022, arXiv:2205.05040.
    - Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: adaptive gradient clipping for source separation networks",
      MLSP 2020, arXiv:2007.14469.
    - Kumar, Owen, Chowdhury, Güra, "ZClip: adaptive spike mitigation for LLM pre-training", arXiv:2504.02507.
    - Brock, De, Smith, Simonyan, "High-performance large-scale image recognition without normalization",
      ICML 2021, arXiv:2102.06171.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence

import torch


__all__ = [
    "CLIP_POLICIES",
    "ClipPolicy",
    "FixedClip",
    "PercentileClip",
    "StepLengthClip",
    "UnitwiseClip",
    "ZScoreClip",
    "get_clip_policy",
    "list_clip_policies",
    "register_clip_policy",
]


def _check_positive(name: str, value, *, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number {bound})")


def _check_int(name: str, value, minimum: int):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")


def _check_choice(name: str, value, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; valid values: {', '.join(map(repr, choices))}")


class ClipPolicy:
    """Base class of clip policies.

    A subclass sets `name`, stores its constructor arguments so that [`ClipPolicy.config`] can rebuild it, and
    implements [`ClipPolicy.threshold`]. Stateful policies also implement `state_dict` / `load_state_dict` with
    plain Python values only (they are written to `trainer_state.json` and to `scheduler.pt`, which the Trainer
    reloads with `weights_only=True`).
    """

    name: str = ""
    #: Unit-wise policies clip the gradients themselves through `clip_units_` and have no global threshold.
    unitwise: bool = False

    def threshold(self, grad_norm: float, *, lr: float, base_lr: float) -> float:
        """Return the clip threshold c_t for this step (`math.inf`: no clipping). May update the policy state.

        Args:
            grad_norm (`float`): The finite pre-clip global L2 norm G_t of the gradients.
            lr (`float`): The scheduled learning rate eta_t of the first parameter group.
            base_lr (`float`): That group's `initial_lr` (the schedule's peak), or `lr` when no scheduler set one.
        """
        raise NotImplementedError

    def config(self) -> dict:
        """The keyword arguments that rebuild this policy with `get_clip_policy(self.name, **config)`."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class FixedClip(ClipPolicy):
    """Clip the global gradient norm at a constant threshold: the Trainer's `max_grad_norm`, with telemetry.

    Args:
        max_norm (`float`, *optional*):
            The threshold c. `None` means "the Trainer's `TrainingArguments.max_grad_norm`": [`ClipAwareCallback`]
            fills it in when training starts (a `max_grad_norm` of 0 then means "never clip, only observe").
            Outside the Trainer it must be given.
    """

    name = "fixed"

    def __init__(self, max_norm: float | None = None):
        _check_positive("max_norm", max_norm, allow_none=True)
        self.max_norm = max_norm
        self._inherited: float | None = None

    def inherit(self, max_grad_norm: float) -> None:
        """Use `max_grad_norm` (a Trainer argument) when no explicit `max_norm` was given; 0 disables clipping."""
        if self.max_norm is None:
            self._inherited = max_grad_norm if max_grad_norm > 0 else math.inf

    def threshold(self, grad_norm, *, lr, base_lr):
        if self.max_norm is not None:
            return self.max_norm
        if self._inherited is None:
            raise ValueError(
                "FixedClip(max_norm=None) takes its threshold from TrainingArguments.max_grad_norm, which only "
                "ClipAwareCallback can read; outside the Trainer pass max_norm, e.g. FixedClip(max_norm=1.0)."
            )
        return self._inherited

    def config(self):
        return {"max_norm": self.max_norm}


class StepLengthClip(ClipPolicy):
    """Clip the step length: c_t = gamma / eta_t, so that eta_t * ||g_t|| never exceeds gamma.

    With plain SGD the update becomes x <- x - min(eta_t, gamma / ||g_t||) g_t, the clipped-GD step of Zhang et al.
    (2020) and the local step of CELGC (Liu et al., 2022). Under a decaying schedule the grad-norm threshold gamma/eta_t
    *rises*; `gamma_schedule="follow_lr"` decays gamma with the schedule instead (gamma_t = gamma * eta_t / eta_peak),
    which keeps the threshold at gamma / eta_peak, as the CELGC authors' training script does at each lr decay.

    Args:
        gamma (`float`): The step-length cap gamma.
        gamma_schedule (`str`, *optional*, defaults to `"constant"`): `"constant"` or `"follow_lr"`. eta_peak is
            the parameter group's `initial_lr`, which every `torch.optim.lr_scheduler` scheduler records.

    NOTE: with Adam-family optimizers clipping the gradient does not bound the step; pair this policy with
    `apply_to="lr"` there, which scales the learning rate instead.
    """

    name = "step_length"

    def __init__(self, gamma: float, gamma_schedule: str = "constant"):
        _check_positive("gamma", gamma)
        _check_choice("gamma_schedule", gamma_schedule, ("constant", "follow_lr"))
        self.gamma = gamma
        self.gamma_schedule = gamma_schedule

    def threshold(self, grad_norm, *, lr, base_lr):
        eta = base_lr if self.gamma_schedule == "follow_lr" else lr
        # eta = 0 (e.g. the first step of a linear warm-up) takes no step at all, so there is nothing to clip.
        return self.gamma / eta if eta > 0 else math.inf

    def config(self):
        return {"gamma": self.gamma, "gamma_schedule": self.gamma_schedule}


class PercentileClip(ClipPolicy):
    """AutoClip: clip at the p-th percentile of the gradient norms seen so far, the current one included.

    Args:
        percentile (`float`, *optional*, defaults to 10.0): p in [0, 100]; the paper recommends 10.
        history_size (`int`, *optional*, defaults to 10000): How many recent norms to keep; `None` keeps all of
            them, as in the paper (the history is saved with every checkpoint, so keep it bounded for long runs).
    """

    name = "percentile"

    def __init__(self, percentile: float = 10.0, history_size: int | None = 10_000):
        _check_positive("percentile", percentile, allow_zero=True)
        if percentile > 100:
            raise ValueError(f"Invalid percentile: {percentile!r} (expected a number in [0, 100])")
        if history_size is not None:
            _check_int("history_size", history_size, 1)
        self.percentile = percentile
        self.history_size = history_size
        self._history: deque[float] = deque(maxlen=history_size)
        self._sorted: list[float] = []

    def _push(self, value: float) -> None:
        if self.history_size is not None and len(self._history) == self.history_size:
            oldest = self._history.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._history.append(value)
        bisect.insort(self._sorted, value)

    def threshold(self, grad_norm, *, lr, base_lr):
        self._push(grad_norm)
        s = self._sorted
        rank = (len(s) - 1) * self.percentile / 100.0
        low = math.floor(rank)
        high = min(low + 1, len(s) - 1)
        return s[low] + (s[high] - s[low]) * (rank - low)

    def config(self):
        return {"percentile": self.percentile, "history_size": self.history_size}

    def state_dict(self):
        return {"history": list(self._history)}

    def load_state_dict(self, state):
        self._history.clear()
        self._sorted = []
        for value in state.get("history", []):
            self._push(float(value))


class ZScoreClip(ClipPolicy):
    """ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics of past norms.

    For the first `warmup_steps` steps the norms are collected (and clipped at `max_grad_norm`, if set); their mean
    and population variance then initialise the EMAs mu and sigma^2. Afterwards, with z = (G_t - mu) / (sigma + eps):

    * if z > z_thresh (a spike), c = clip_factor * (mu + z_thresh * sigma / (z / z_thresh)) for
      `clip_option="adaptive_scaling"`, or c = mu for `clip_option="mean"`;
    * the threshold is min(c, max_grad_norm), or just `max_grad_norm` (+inf when `None`) without a spike;
    * the EMAs are updated with c on spikes (unless `skip_update_on_spike`) and with G_t otherwise:
      mu <- alpha mu + (1 - alpha) x, then sigma^2 <- alpha sigma^2 + (1 - alpha) (x - mu)^2.

    Args:
        alpha (`float`, *optional*, defaults to 0.97): EMA factor, in (0, 1).
        z_thresh (`float`, *optional*, defaults to 2.5): z-score above which a norm is a spike.
        max_grad_norm (`float`, *optional*, defaults to 1.0): A fixed cap on top of the adaptive threshold; `None`
            disables it.
        eps (`float`, *optional*, defaults to 1e-6): Added to sigma in the z-score.
        warmup_steps (`int`, *optional*, defaults to 25): Norms collected before the EMAs start.
        clip_option (`str`, *optional*, defaults to `"adaptive_scaling"`): `"adaptive_scaling"` or `"mean"`.
        clip_factor (`float`, *optional*, defaults to 1.0): Multiplies the adaptive threshold (< 1 is more
            aggressive).
        skip_update_on_spike (`bool`, *optional*, defaults to `False`): Leave the EMAs unchanged on spike steps.
    """

    name = "zscore"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ):
        _check_positive("alpha", alpha)
        if alpha >= 1:
            raise ValueError(f"Invalid alpha: {alpha!r} (expected a number in (0, 1))")
        _check_positive("z_thresh", z_thresh)
        _check_positive("max_grad_norm", max_grad_norm, allow_none=True)
        _check_positive("eps", eps, allow_zero=True)
        _check_int("warmup_steps", warmup_steps, 1)
        _check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        _check_positive("clip_factor", clip_factor)
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"Invalid skip_update_on_spike: {skip_update_on_spike!r} (expected a bool)")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.clip_option = clip_option
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self._buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def threshold(self, grad_norm, *, lr, base_lr):
        cap = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        if self.mean is None:
            self._buffer.append(grad_norm)
            if len(self._buffer) >= self.warmup_steps:
                n = len(self._buffer)
                self.mean = sum(self._buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self._buffer) / n
                self._buffer = []
            return cap

        std = math.sqrt(self.var)
        z = (grad_norm - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        if spike:
            if self.clip_option == "adaptive_scaling":
                adaptive = self.clip_factor * (self.mean + self.z_thresh * std / (z / self.z_thresh))
            else:
                adaptive = self.mean
            threshold = min(adaptive, cap)
        else:
            threshold = cap
        if not (spike and self.skip_update_on_spike):
            x = adaptive if spike else grad_norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return threshold

    def config(self):
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "max_grad_norm": self.max_grad_norm,
            "eps": self.eps,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "clip_factor": self.clip_factor,
            "skip_update_on_spike": self.skip_update_on_spike,
        }

    def state_dict(self):
        return {"buffer": list(self._buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state):
        self._buffer = [float(x) for x in state.get("buffer", [])]
        self.mean = state.get("mean")
        self.var = state.get("var")


#: Final-layer module names that AGC leaves unclipped by default (transformers' heads).
DEFAULT_AGC_EXCLUDE = ("classifier", "lm_head", "score", "qa_outputs", "cls")


class UnitwiseClip(ClipPolicy):
    """AGC: clip each output unit's gradient relative to the norm of its weights.

    For every parameter W with gradient G, and every output unit i (a row of a weight matrix; the whole tensor when
    W has one dimension or none): if ||G_i|| > clip_factor * max(||W_i||, eps), then
    G_i <- G_i * clip_factor * max(||W_i||, eps) / ||G_i||. Parameters of the final classifier are left alone, as the
    NFNet paper recommends; they are found by module name (`exclude`).

    Args:
        clip_factor (`float`, *optional*, defaults to 0.01): lambda; smaller suits larger batches.
        eps (`float`, *optional*, defaults to 1e-3): Floor on the weight norm (zero-initialised weights).
        exclude (`Sequence[str]`, *optional*, defaults to `("classifier", "lm_head", "score", "qa_outputs", "cls")`):
            Module names whose parameters are never clipped. A parameter is excluded when one of the names is a
            component of its dotted name (`classifier.weight`, `bert.cls.predictions.bias`, ...).

    NOTE: a weight tied to an excluded head (e.g. GPT-2's `lm_head` tied to `wte`) is named after its first owner
    by `named_parameters()` and is therefore clipped. The logged `clip/coef` is the ratio of the post- to the
    pre-clip global norm.
    """

    name = "unitwise"
    unitwise = True

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = DEFAULT_AGC_EXCLUDE):
        _check_positive("clip_factor", clip_factor)
        _check_positive("eps", eps, allow_zero=True)
        if isinstance(exclude, str) or not all(isinstance(e, str) and e for e in exclude):
            raise ValueError(f"Invalid exclude: {exclude!r} (expected a sequence of non-empty module names)")
        self.clip_factor = clip_factor
        self.eps = eps
        self.exclude = tuple(exclude)

    def is_excluded(self, name: str) -> bool:
        dotted = f".{name}."
        return any(f".{pattern}." in dotted for pattern in self.exclude)

    def threshold(self, grad_norm, *, lr, base_lr):
        raise TypeError("UnitwiseClip has no global threshold; ClipAwareSchedule calls clip_units_ instead.")

    @staticmethod
    def _unit_norms(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return torch.linalg.vector_norm(x).reshape(1)
        return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)))

    @torch.no_grad()
    def clip_units_(
        self, named_params: Iterable[tuple[str, torch.Tensor]], grad_norm: float
    ) -> tuple[float, int, int]:
        """Clip the gradients of `named_params` in place.

        Returns:
            `(coef, units_clipped, units_total)`: the post/pre ratio of the global gradient norm, how many
            output units were clipped, and how many units were considered (excluded parameters not counted).
        """
        post_sq = 0.0
        clipped = 0
        total = 0
        for name, param in named_params:
            grad = param.grad
            if self.is_excluded(name):
                post_sq += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
                continue
            g_norm = self._unit_norms(grad.float())
            max_norm = self._unit_norms(param.detach().float()).clamp_(min=self.eps).mul_(self.clip_factor)
            over = g_norm > max_norm
            n_over = int(over.sum())
            total += g_norm.numel()
            clipped += n_over
            if n_over:
                scale = torch.where(over, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
                shape = (-1,) + (1,) * (grad.ndim - 1) if grad.ndim > 1 else ()
                grad.mul_(scale.reshape(shape).to(grad.dtype))
            post_sq += float(torch.minimum(g_norm, max_norm).square().sum())
        coef = math.sqrt(post_sq) / grad_norm if grad_norm > 0 else 1.0
        return min(coef, 1.0), clipped, total

    def config(self):
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude": list(self.exclude)}


#: name -> policy class. Extend with [`register_clip_policy`].
CLIP_POLICIES: dict[str, type[ClipPolicy]] = {
    cls.name: cls for cls in (FixedClip, StepLengthClip, PercentileClip, ZScoreClip, UnitwiseClip)
}


def list_clip_policies() -> list[str]:
    """The names [`get_clip_policy`] accepts."""
    return sorted(CLIP_POLICIES)


def get_clip_policy(name: str | ClipPolicy, **kwargs) -> ClipPolicy:
    """Build a clip policy from its name (or return a policy object unchanged).

    Args:
        name (`str` or [`ClipPolicy`]): One of [`list_clip_policies`].
        kwargs: The policy's constructor arguments.

    Raises:
        `ValueError`: For an unknown name (the message lists the valid ones), or keyword arguments passed with a
            policy object.

    Example:

    ```python
    >>> from hf_clinic.clipping import get_clip_policy
    >>> get_clip_policy("zscore", z_thresh=3.0)
    ZScoreClip(alpha=0.97, z_thresh=3.0, ...)
    ```
    """
    if isinstance(name, ClipPolicy):
        if kwargs:
            raise ValueError(f"Got a policy object {name!r} and extra keyword arguments {sorted(kwargs)}; pass one.")
        return name
    if name not in CLIP_POLICIES:
        raise ValueError(f"Unknown clip policy {name!r}; valid names: {', '.join(list_clip_policies())}")
    cls = CLIP_POLICIES[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"Invalid arguments for clip policy {name!r}: {err}") from err


def register_clip_policy(cls: type[ClipPolicy]) -> type[ClipPolicy]:
    """Make a [`ClipPolicy`] subclass available by its `name` (usable as a class decorator).

    Raises:
        `ValueError`: If the name is empty or already taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, ClipPolicy)) or not cls.name:
        raise ValueError(f"register_clip_policy expects a ClipPolicy subclass with a non-empty `name`, got {cls!r}")
    existing = CLIP_POLICIES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"Clip policy name {cls.name!r} is already used by {existing.__name__}")
    CLIP_POLICIES[cls.name] = cls
    return cls
