"""Saving and loading Admin checkpoints.

An Admin model saves with plain `save_pretrained` (and in every Trainer checkpoint): the ω vectors are ordinary
parameters (`*.admin_omega`) and `config.json` carries an `admin` entry describing the wiring. [`load_admin`] rebuilds
the stock model, re-attaches the wiring and restores ω exactly.

Stock `from_pretrained` cannot do that: it does not know the ω keys, drops them and returns a model with the wrong
outputs. transformers gives a checkpoint no way to make its own loader refuse: unknown `config.json` keys are stored
silently, and an `auto_map` is ignored for model types transformers already knows (`resolve_trust_remote_code` picks
the local class). The one thing stock loading reports by default is its LOAD REPORT warning, which lists every
unexpected weight key. So Admin checkpoints carry, besides the ω keys, one self-describing marker key,

    HF_CLINIC_ADMIN__load_with_hf_clinic_load_admin__publish_with_save_vanilla

(a 1-element uint8 buffer on the model), and a stock load warns with that instruction in its table of unexpected
keys. hf_clinic entry points given such a model (apply_admin, export_vanilla, AdminCallback) refuse it with the
same advice. For publishing, [`save_vanilla`] writes a true stock checkpoint with ω folded in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn

from . import _wiring
from .core import MARKER, _check_marker_format
from .sites import OMEGA_NAME, AdminArchitecture, resolve_architecture


logger = logging.getLogger(__name__)

__all__ = ["MARKER_KEY", "load_admin"]

MARKER_KEY = "HF_CLINIC_ADMIN__load_with_hf_clinic_load_admin__publish_with_save_vanilla"


def add_marker_key(model: nn.Module) -> None:
    if MARKER_KEY not in model._buffers:
        device = next(model.parameters()).device
        model.register_buffer(MARKER_KEY, torch.ones(1, dtype=torch.uint8, device=device))


def remove_marker_key(model: nn.Module) -> None:
    model._buffers.pop(MARKER_KEY, None)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_load_report():
    # The stock report would list the ω keys as UNEXPECTED; load_admin checks the loading info itself instead.
    target = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _weight_files(path: str, **hub_kwargs) -> list[str]:
    from transformers.utils import cached_file

    def find(name):
        try:
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except OSError:
            return None

    index = find("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [find(shard) for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = find(name)
        if found is not None:
            return [found]
    raise OSError(f"No model.safetensors or pytorch_model.bin found at {path}")


def _read_omegas(files: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.endswith(OMEGA_NAME):
                        out[key] = f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if k.endswith(OMEGA_NAME)})
    return out


def load_admin(
    path: str | os.PathLike,
    model_class: type | None = None,
    *,
    sites: AdminArchitecture | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Load an Admin checkpoint written by `save_pretrained` (or a Trainer checkpoint) exactly.

    Builds the stock model with `model_class.from_pretrained`, re-attaches the Admin wiring recorded in
    `config.admin` and copies every `*.admin_omega` tensor from the weight files (safetensors or `.bin`, sharded or
    not) into it. The result has the same outputs as the saved model and can keep training, be exported with
    [`export_vanilla`], or be wrapped with PEFT.

    Args:
        path (`str` or `os.PathLike`): a checkpoint folder or Hub id.
        model_class (`type`, *optional*): the transformers class to build; defaults to `config.architectures[0]`.
        sites (`AdminArchitecture`, *optional*): required only if the model was wired with a custom `sites=`.
        **from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `revision`, ...). ω is always
            kept in float32.

    Returns:
        `PreTrainedModel`: the Admin model.

    Raises:
        `ValueError`: the checkpoint has no `admin` entry in its config, or lacks the ω of some site.

    Example:

    ```py
    >>> model.save_pretrained("out/admin-marian")        # an Admin model
    >>> from hf_clinic import load_admin
    >>> model = load_admin("out/admin-marian")            # exact
    ```
    """
    import transformers

    hub_kwargs = {
        k: from_pretrained_kwargs[k] for k in ("revision", "cache_dir", "token") if k in from_pretrained_kwargs
    }
    config = transformers.AutoConfig.from_pretrained(path, **hub_kwargs)
    marker = getattr(config, MARKER, None)
    if not isinstance(marker, dict):
        raise ValueError(f"{path} is not an Admin checkpoint (its config has no `admin` entry); use from_pretrained.")
    _check_marker_format(marker)
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(
                f"Cannot tell the model class of {path} (architectures={architectures}); pass model_class"
            )
        model_class = getattr(transformers, architectures[0])
    if marker.get("custom_sites") and sites is None:
        raise ValueError(f"{path} was wired with a custom `sites=` table; pass the same `sites=` to load_admin")

    with _quiet_load_report():
        model, info = model_class.from_pretrained(
            path, config=config, output_loading_info=True, **from_pretrained_kwargs
        )
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(OMEGA_NAME) and k != MARKER_KEY)
    if unexpected or info["missing_keys"] or info["mismatched_keys"]:
        logger.warning(
            "load_admin(%s): unexpected keys %s, missing keys %s, mismatched keys %s",
            path,
            unexpected,
            sorted(info["missing_keys"]),
            sorted(info["mismatched_keys"]),
        )

    model_type, arch = resolve_architecture(model, sites)
    all_sites = _wiring.find_sites(model, arch, model_type)
    fixed = set(marker.get("fixed_sites", []))
    for site in all_sites:
        site.has_omega = site.norm_name not in fixed
    _wiring.attach(arch, all_sites, {id(s): 1.0 for s in all_sites}, bool(marker.get("trainable", True)))
    _wiring.self_test(model, arch, all_sites, model_type)

    stored = _read_omegas(_weight_files(str(path), **hub_kwargs))
    prefix = getattr(model, "base_model_prefix", "")
    with torch.no_grad():
        for name, param in _wiring.omega_parameters(model):
            candidates = [name, f"{prefix}.{name}"]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            key = next((c for c in candidates if c in stored), None)
            if key is None:
                _wiring.detach(model)
                raise ValueError(f"{path}: the checkpoint has no ω for {name} (looked for {candidates})")
            param.copy_(stored[key].to(param.dtype))
    add_marker_key(model)
    logger.info("load_admin(%s): restored %d ω vectors", path, len(_wiring.omega_parameters(model)))
    return model
