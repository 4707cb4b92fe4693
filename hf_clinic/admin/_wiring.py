"""Putting ω into a stock transformers model with hooks, and taking it out again. Copies no model code.

Three wirings (see [`AdminArchitecture`]):

* `residual_arg` (BERT family): a forward pre-hook on `*SelfOutput` / `*Output` replaces the `input_tensor` argument
  by `ω⊙input_tensor`, so the module computes `LayerNorm(dropout(dense(h)) + ω⊙input_tensor)`. Stateless.
* `residual_capture` (Marian, BART): a read-only pre-hook on the branch entry (`self_attn`, `encoder_attn`, `fc1`)
  records its first input, which *is* the residual `r`, on the consuming norm; a pre-hook on that norm turns its input
  `z = r + F` into `z + (ω−1)⊙r = ω⊙r + F` and clears the record. Read-only on the branch, so PEFT LoRA (which wraps
  the Linears) and gradient checkpointing (which re-runs both hooks on recompute) stay exact.
* `branch_gain` (T5): a forward hook on `SelfAttention` / `EncDecAttention` / `DenseReluDense` multiplies the branch
  output by `g` (dropout commutes with a per-feature scale).

Design rules (from the spec, admin.md §5.1): ω is an fp32 `nn.Parameter` named `admin_omega` on the norm module, so it
travels with its layer and is left out of weight decay by the Trainer; hooks are module-level functions that find ω
through non-registered back-references (`object.__setattr__`), never closures, so `copy.deepcopy` gives a copy wired
to its own ω; modifying hooks sit on containers, never on Linears (PEFT replaces those).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from .sites import OMEGA_NAME, AdminArchitecture


_NORM_REF = "_admin_norm"  # entry module -> norm module holding ω (non-registered back-reference)
_RESIDUAL = "_admin_residual"  # norm module -> residual captured for the current call (residual_capture wiring)


class AdminWiringError(RuntimeError):
    """The model does not run the way its Admin wiring assumes (e.g. a Pre-LN model wired as Post-LN)."""


@dataclasses.dataclass
class Site:
    """One residual sublayer of a concrete model (internal)."""

    stack: str
    index: int  # 1-based, forward order within the stack
    kind: str
    norm_name: str
    norm: nn.Module
    entry: nn.Module
    producer_name: str | None  # affine module producing this sublayer's input (export fold target)
    producer: nn.Module | None
    fold: list[tuple[str, nn.Module]]
    has_omega: bool = True

    @property
    def omega_name(self) -> str:
        return f"{self.norm_name}.{OMEGA_NAME}" if self.norm_name else OMEGA_NAME


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def find_sites(model: nn.Module, arch: AdminArchitecture, model_type: str) -> list[Site]:
    """Resolve the architecture's paths on `model` into concrete sites, in forward order per stack."""
    base = getattr(model, "base_model", model)
    names = _names(model)
    sites: list[Site] = []
    for stack in arch.stacks:
        layers = _get(base, stack.layers)
        if layers is None:
            continue  # e.g. T5EncoderModel has no decoder
        producer_name, producer = None, None
        for path in stack.input_producers:
            producer = _get(base, path)
            if producer is not None:
                producer_name = names[id(producer)]
                break
        index = 0
        for layer in layers:
            for spec in stack.sublayers:
                norm, entry = _get(layer, spec.norm), _get(layer, spec.entry)
                if norm is None or entry is None:
                    if spec.optional and _get(layer, spec.entry.split(".")[0]) is None:
                        continue
                    missing = spec.norm if norm is None else spec.entry
                    raise ValueError(
                        f"Admin ({model_type}): {names[id(layer)]} has no submodule {missing!r}. The model does not "
                        "have the Post-LN layer layout this wiring expects (a Pre-LN variant keeps no norm after the "
                        "residual sum), or its transformers version renamed modules. Supported types: see "
                        "hf_clinic.admin.ADMIN_ARCHITECTURES."
                    )
                fold = []
                for path in spec.fold:
                    linear = _get(layer, path)
                    if linear is None:
                        raise ValueError(f"Admin ({model_type}): {names[id(layer)]} has no submodule {path!r}")
                    fold.append((names[id(linear)], linear))
                index += 1
                sites.append(
                    Site(
                        stack=stack.name,
                        index=index,
                        kind=spec.kind,
                        norm_name=names[id(norm)],
                        norm=norm,
                        entry=entry,
                        producer_name=producer_name,
                        producer=producer,
                        fold=fold,
                    )
                )
                # The next sublayer reads this norm's output.
                producer_name, producer = names[id(norm)], norm
    if not sites:
        raise ValueError(
            f"Admin ({model_type}): no residual sublayers found under {type(base).__name__} at "
            f"{[s.layers for s in arch.stacks]}"
        )
    return sites


# --- hooks (module-level functions: deepcopy- and pickle-safe) -----------------------------------------------------


def _scaled(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    # ω stays fp32; multiply in fp32 and cast back so bf16/fp16 activations keep their dtype.
    if x.dtype == torch.float32:
        return x * omega
    return (x.float() * omega.float()).to(x.dtype)


def _residual_arg_hook(module, args, kwargs):
    omega = getattr(module, _NORM_REF).admin_omega
    if "input_tensor" in kwargs:
        kwargs = dict(kwargs)
        kwargs["input_tensor"] = _scaled(kwargs["input_tensor"], omega)
        return args, kwargs
    return (args[0], _scaled(args[1], omega), *args[2:]), kwargs


def _capture_hook(module, args, kwargs):
    residual = args[0] if args else kwargs["hidden_states"]
    object.__setattr__(getattr(module, _NORM_REF), _RESIDUAL, residual)


def _mix_hook(module, args):
    residual = module.__dict__.get(_RESIDUAL)
    if residual is None:
        raise AdminWiringError(
            f"Admin: the norm {type(module).__name__} ran without first seeing its sublayer's residual. Its layer does "
            "not compute `norm(residual + branch(residual))`: a Pre-LN model, or a transformers change. Admin's "
            "residual ω is defined for Post-LN models only."
        )
    object.__setattr__(module, _RESIDUAL, None)
    z = args[0]
    if z.dtype == torch.float32:
        return (torch.addcmul(z, residual, module.admin_omega - 1.0),)  # one fused op: z + (ω−1)⊙r
    return ((z.float() + (module.admin_omega.float() - 1.0) * residual.float()).to(z.dtype),)


def _branch_gain_hook(module, args, output):
    gain = getattr(module, _NORM_REF).admin_omega
    if isinstance(output, tuple):
        return (_scaled(output[0], gain), *output[1:])
    return _scaled(output, gain)


_HOOKS = (_residual_arg_hook, _capture_hook, _mix_hook, _branch_gain_hook)


def attach(arch: AdminArchitecture, sites: list[Site], values: dict[int, float], trainable: bool) -> None:
    """Register ω on each site that has one and install the hooks. `values` maps `id(site)` to the initial ω."""
    for site in sites:
        if not site.has_omega:
            continue
        ref = next(site.norm.parameters(), None)
        device = ref.device if ref is not None else None
        omega = torch.full((_width(site),), float(values[id(site)]), dtype=torch.float32, device=device)
        site.norm.register_parameter(OMEGA_NAME, nn.Parameter(omega, requires_grad=trainable))
        object.__setattr__(site.entry, _NORM_REF, site.norm)
        if arch.wiring == "residual_arg":
            site.entry.register_forward_pre_hook(_residual_arg_hook, with_kwargs=True)
        elif arch.wiring == "residual_capture":
            object.__setattr__(site.norm, _RESIDUAL, None)
            site.entry.register_forward_pre_hook(_capture_hook, with_kwargs=True)
            site.norm.register_forward_pre_hook(_mix_hook)
        else:
            site.entry.register_forward_hook(_branch_gain_hook)


def _width(site: Site) -> int:
    weight = getattr(site.norm, "weight", None)
    if weight is not None:
        return weight.shape[0]
    shape = getattr(site.norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    raise ValueError(f"Admin: cannot tell the width of norm {site.norm_name}")


def detach(model: nn.Module) -> int:
    """Remove every Admin hook, ω parameter and back-reference from `model`. Returns the number of ω removed."""
    removed = 0
    for module in model.modules():
        for table, kwtable in (
            ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
            ("_forward_hooks", "_forward_hooks_with_kwargs"),
        ):
            hooks = getattr(module, table)
            for hook_id, fn in list(hooks.items()):
                if fn in _HOOKS:
                    del hooks[hook_id]
                    getattr(module, kwtable).pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)
        if OMEGA_NAME in module._parameters:
            del module._parameters[OMEGA_NAME]
            removed += 1
        for attr in (_NORM_REF, _RESIDUAL):
            module.__dict__.pop(attr, None)
    return removed


def omega_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`(name, ω)` for every Admin parameter of `model`, in module order."""
    return [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if name.endswith(OMEGA_NAME)]


def clear_captures(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.get(_RESIDUAL) is not None:
            object.__setattr__(module, _RESIDUAL, None)


# --- self-test --------------------------------------------------------------------------------------------------


def _dummy_inputs(model: nn.Module) -> tuple[nn.Module, dict]:
    base = getattr(model, "base_model", model)
    config = model.config
    vocab = int(getattr(config, "vocab_size", 8) or 8)
    device = next(model.parameters()).device
    ids = (torch.arange(5, device=device).unsqueeze(0) % max(vocab - 3, 1)) + min(3, vocab - 1)
    inputs = {"input_ids": ids}
    if "decoder_input_ids" in inspect.signature(base.forward).parameters and getattr(
        config, "is_encoder_decoder", False
    ):
        inputs["decoder_input_ids"] = ids[:, :4]
    return base, inputs


def self_test(model: nn.Module, arch: AdminArchitecture, sites: list[Site], model_type: str) -> None:
    """Run one tiny eval forward and check that every site's hooks fire in the order the wiring assumes.

    Catches Pre-LN models wired as Post-LN (the norm runs before its branch) and transformers changes that move the
    residual add, instead of silently mis-scaling.
    """
    seen: dict[int, list[str]] = {id(s): [] for s in sites}
    handles = []

    def record(tag):
        def hook(module, *_):
            seen[module.__dict__["_admin_selftest_site"]].append(tag)

        return hook

    for site in sites:
        for module in (site.entry, site.norm):
            module.__dict__["_admin_selftest_site"] = id(site)
        if arch.wiring == "branch_gain":
            handles.append(site.entry.register_forward_hook(record("entry")))
        else:
            handles.append(site.entry.register_forward_pre_hook(record("entry"), prepend=True))
            handles.append(site.norm.register_forward_pre_hook(record("norm"), prepend=True))
    base, inputs = _dummy_inputs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base(**inputs)
    except AdminWiringError as err:
        raise ValueError(
            f"Admin ({model_type}): the self-test forward found a norm that runs before its branch, i.e. a Pre-LN "
            "layer. Admin's residual ω is defined for Post-LN models only (the official code asserts "
            "`not normalize_before`); for pre-norm models use the branch-gain wiring (T5)."
        ) from err
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        for site in sites:
            site.entry.__dict__.pop("_admin_selftest_site", None)
            site.norm.__dict__.pop("_admin_selftest_site", None)
        clear_captures(model)
    for site in sites:
        events = seen[id(site)]
        if arch.wiring == "branch_gain":
            ok = "entry" in events
        elif site.kind == "cross_attention" and not events:
            ok = True  # cross-attention does not run without encoder states (decoder-style BERT in the self-test)
        else:
            ok = bool(events) and events[0] == "entry" and "norm" in events
        if not ok:
            raise ValueError(
                f"Admin ({model_type}): self-test failed at {site.norm_name} (events {events}): the residual sum is "
                "not consumed by this norm after its branch, as a Post-LN layer would. This looks like a Pre-LN model "
                "or an unsupported layer layout; Admin's residual ω is defined for Post-LN models only."
            )
