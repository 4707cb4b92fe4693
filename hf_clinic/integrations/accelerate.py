"""Which sharded backends the hf-clinic optimizers support, and an early, clear refusal of the others.

LAMB and LARS rescale every parameter tensor by a trust ratio built from the tensor's norm. A sharded backend that
hands the optimizer pieces of tensors makes that norm a per-shard norm: the step is then silently wrong. hf-clinic
therefore detects the backend before the optimizer exists and refuses the combinations it cannot do right:

| backend                       | what the optimizer sees                      | RAdam / GSignSGD | LAMB / LARS        |
|-------------------------------|----------------------------------------------|------------------|--------------------|
| DDP, single process           | whole tensors                                | supported        | supported          |
| FSDP2 (`fully_shard`)         | `DTensor`s; norms are all-reduced by DTensor | supported        | supported (exact)  |
| FSDP1 (`FullyShardedDataParallel`) | flat 1-D shards                         | refused          | refused            |
| DeepSpeed ZeRO-1/2            | flat fp32 partitions per param group         | supported        | refused            |
| DeepSpeed ZeRO-3              | empty placeholders (`ds_shape`) + partitions | refused          | refused            |

Under FSDP1 and ZeRO-3 even the element-wise optimizers are refused: `hf_clinic.param_groups` decides weight decay
by `ndim`, and every parameter there looks 1-D. FSDP2 keeps parameters as `DTensor`s whose `norm()` is the norm of
the full tensor, so LAMB/LARS trust ratios are exact (checked against an unsharded run in
`tests/scripts/integ_ddp.py`).

NOTE: like `accelerate.local_sgd.LocalSGD`, this refuses early with `NotImplementedError` instead of degrading.
"""

from __future__ import annotations

import json
import os
from typing import Any


__all__ = ["LAYERWISE_OPTIMIZERS", "check_sharding_support", "detect_sharding"]

# Optimizers whose update depends on whole-tensor norms (trust ratios).
LAYERWISE_OPTIMIZERS = ("Lamb", "Lars")


def _fsdp_version(fsdp_config: Any) -> int:
    config = fsdp_config or {}
    return int(config.get("version", config.get("fsdp_version", 2)))


def _deepspeed_stage(config: Any) -> int:
    """ZeRO stage of a DeepSpeed config given as a dict, a JSON string or a path (0 when absent)."""
    if isinstance(config, str):
        if os.path.isfile(config):
            with open(config) as f:
                config = json.load(f)
        else:
            config = json.loads(config)
    if not isinstance(config, dict):
        config = getattr(config, "config", {}) or {}
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return 0 if stage == "auto" else int(stage)


def _from_model(model) -> str | None:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return "fsdp1"
        if isinstance(module, FSDPModule):
            return "fsdp2"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "deepspeed_zero3"
    return None


def _from_args(args) -> str | None:
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        hf_config = getattr(args, "hf_deepspeed_config", None)
        return f"deepspeed_zero{_deepspeed_stage(hf_config if hf_config is not None else deepspeed)}"
    if getattr(args, "fsdp", None):
        return f"fsdp{_fsdp_version(getattr(args, 'fsdp_config', None))}"
    return None


def _from_accelerate_state() -> str | None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:
        return None
    state = AcceleratorState()
    if state.distributed_type == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        return f"deepspeed_zero{int(getattr(plugin, 'zero_stage', 0) or 0)}"
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{int(getattr(state.fsdp_plugin, 'fsdp_version', 1))}"
    return None


def detect_sharding(model=None, args=None) -> str | None:
    """The sharded backend a model is (or is about to be) trained with.

    Looks at the model's modules and parameters first (FSDP1/FSDP2 wrappers, DeepSpeed ZeRO-3 parameters), then at
    `TrainingArguments.deepspeed` / `fsdp` / `fsdp_config`, then at Accelerate's process-wide state (set by
    `accelerate launch --use_fsdp|--use_deepspeed` or an `Accelerator(fsdp_plugin=..., deepspeed_plugin=...)`).

    Args:
        model (`torch.nn.Module`, *optional*): The model the optimizer is built for.
        args (`transformers.TrainingArguments`, *optional*): The Trainer's arguments.

    Returns:
        `"fsdp1"`, `"fsdp2"`, `"deepspeed_zero0"` ... `"deepspeed_zero3"`, or `None` (no sharding).
    """
    return (
        (_from_model(model) if model is not None else None)
        or (_from_args(args) if args is not None else None)
        or _from_accelerate_state()
    )


def check_sharding_support(optimizer_class: type, *, model=None, args=None) -> None:
    """Refuse a sharded backend under which `optimizer_class` would compute a wrong step.

    Args:
        optimizer_class (`type`): An hf-clinic optimizer class (`RAdam`, `Lamb`, `Lars`, `GeneralizedSignSGD`).
        model (`torch.nn.Module`, *optional*): The model the optimizer is built for.
        args (`transformers.TrainingArguments`, *optional*): The Trainer's arguments.

    Raises:
        `NotImplementedError`: Under FSDP1 or DeepSpeed ZeRO-3 (any hf-clinic optimizer), and under DeepSpeed
            ZeRO-1/2 for LAMB/LARS. The message names the backend and what to use instead.
    """
    backend = detect_sharding(model, args)
    if backend is None or backend in ("fsdp2", "deepspeed_zero0"):
        return
    name = optimizer_class.__name__
    if backend == "fsdp1":
        raise NotImplementedError(
            f"{name} is not supported under FSDP1: FSDP1 hands the optimizer flat 1-D shards, so per-tensor weight "
            f"decay groups and trust ratios would be computed on shards. Use FSDP2 (fsdp_config={{'version': 2}}, "
            f"the transformers default, or `fsdp_version: 2` in the Accelerate config): hf-clinic optimizers compute "
            f"full-tensor norms on its DTensor parameters."
        )
    if backend == "deepspeed_zero3":
        raise NotImplementedError(
            f"{name} is not supported under DeepSpeed ZeRO-3: partitioned parameters are empty placeholders, so "
            f"hf_clinic.param_groups cannot tell matrices from biases and trust ratios would be per-partition. "
            f"Use FSDP2, or DeepSpeed ZeRO-1/2 with RAdam or GSignSGD."
        )
    if name in LAYERWISE_OPTIMIZERS:
        raise NotImplementedError(
            f"{name} is not supported under DeepSpeed {backend.split('_')[1].upper()}: ZeRO flattens each param "
            f"group into one partition per rank, so the trust ratio would be computed per partition instead of per "
            f"layer. Use FSDP2 (exact full-tensor trust ratios) or DDP, or an element-wise optimizer (RAdam, "
            f"GSignSGD) under ZeRO-1/2."
        )
