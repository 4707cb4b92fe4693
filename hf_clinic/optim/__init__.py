"""hf-clinic optimizers: RAdam, LAMB, LARS and Generalized SignSGD (`torch.optim.Optimizer` subclasses).

Every optimizer has three implementations that agree numerically: a for-loop ground truth (`foreach=False`), a
`torch._foreach_*` path (`foreach=True`; the default on CPU and CUDA) and a fused path of compiled per-tensor kernels
(`fused=True`; `fused=None` enables it for param groups large enough to repay the compilation, see
`hf_clinic.optim._fused.fused_by_default`). State is float32 for bfloat16/float16 parameters and survives
`load_state_dict` in float32; the step counter is a per-parameter 0-d float32 tensor `state["step"]`.

Param groups may carry `layer_adaptation=False` (as the no-decay group of `hf_clinic.param_groups` does): `Lamb` and
`Lars` then never apply a trust ratio to that group, whatever their `adapt` mode. `telemetry()` returns the last
step's diagnostics (`radam/rho_t`, `lamb/trust_ratio_median`, ...), computed only when called.
"""

from ._fused import FusedFallbackWarning
from .gsignsgd import GeneralizedSignSGD, gsignsgd
from .lamb import LAMB_PRESETS, Lamb, LambDegeneratesToAdamWarning, lamb
from .lars import Lars, LarsDegeneratesToSGDWarning, lars
from .radam import RAdam, radam


__all__ = [
    "LAMB_PRESETS",
    "FusedFallbackWarning",
    "GeneralizedSignSGD",
    "Lamb",
    "LambDegeneratesToAdamWarning",
    "Lars",
    "LarsDegeneratesToSGDWarning",
    "RAdam",
    "gsignsgd",
    "lamb",
    "lars",
    "radam",
]
