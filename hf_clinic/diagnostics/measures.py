"""The two quantities behind the amplification effect: output change under a small perturbation, and β.

Liu et al. (2020) explain why deep Post-LN Transformers are hard to train with two measurable quantities. Both are
computed here for any model in the Admin residual-site table (`hf_clinic.admin.ADMIN_ARCHITECTURES`), vanilla or
with Admin applied, by hooking the residual sublayers that the table locates; no model code is copied.

**Residual dependency.** A residual sublayer i reads x_{i-1} and computes the residual sum

    Post-LN (BERT, Marian, BART):  b_i = ω_i ⊙ x_{i-1} + F_i(x_{i-1}),   x_i = LN_i(b_i)   (ω_i ≡ 1 without Admin)
    Pre-LN (T5):                   b_i = x_{i-1} + g_i ⊙ F_i(N_i(x_{i-1})),   x_i = b_i    (g_i ≡ 1 without Admin)

The paper writes each layer output as a combination of the normalised branch outputs, x_i = Σ_{j≤i} β_{i,j} â_j,
and calls β_{i,i} the layer's dependency on its own residual branch. With Var the population variance over every
element of the batch tensor, β_{i,i}² = Var[F_i] / Var[b_i] (the paper's footnote 1 defines a layer's dependency
on its residual branch as Var[f(x)] / Var[x + f(x)]), where F_i is the branch as it enters the sum (times g_i for T5).
[`residual_dependency`] reports, per sublayer, `dependency` = β_{i,i}² (the branch's share of the output variance,
in [0, 1] for uncorrelated terms) and `beta` = β_{i,i}. At initialisation a Pre-LN (or Admin) stack has
β_{i,i}² ≈ 1/i, a Post-LN stack with Xavier-initialised branches has β_{i,i}² ≈ 1/2 at every layer.

**Amplification (output change).** For parameters W and a small random perturbation δ, the output change is
|F(x, W) − F(x, W + δ)|. The paper's analysis (§4.2) gives Var[F(x, W) − F(x, W + δ)] ≈ C Σ_i β_{i,i}² for a
small perturbation of the sublayer weights, i.e. O(N) for Post-LN against O(log N) for Pre-LN and Admin. [`measure_amplification`] measures

    change(y)        = ‖y(x, W + δ) − y(x, W)‖₂² / ‖y(x, W)‖₂²
    amplification(y) = change(y) / eps²

for y = the output x_i of every residual sublayer ("per layer": the change accumulated up to that depth) and for
y = F(x, W), the model's last hidden state ("total"; the decoder's for encoder-decoder models), with

    δ_p = eps · rms(W_p) · ξ_p,   ξ_p ~ N(0, I),   rms(W_p) = ‖W_p‖₂ / √numel(W_p),

for every floating-point parameter p of the residual *branches* (every parameter under the stacks' layer lists
except the sublayer norms' affine parameters and Admin's ω), drawn in `model.named_parameters()` order from a
`torch.Generator` seeded with `seed` on the CPU, in the parameter's dtype. A single random linear map has
amplification ≈ 1; a value of A means the perturbation is amplified A-fold (in squared norm) by the depth.

NOTE (deliberate choices where the paper leaves room):

* δ is *relative* to each tensor's scale, so the number does not depend on the init scale (HF's N(0, 0.02²) vs
  Xavier) and matches the theorem's assumption of a comparable perturbation of every normalised branch.
* The norms' affine parameters and ω are not perturbed: the paper's analysis perturbs the sublayer weights W_i; a
  perturbed LayerNorm gain passes straight to the output at every depth and would add an O(N) term unrelated to
  the residual dependency. `include_norms=True` perturbs them too.
* The change is normalised by ‖y‖² so that values compare across depths and models whose outputs have different
  scales (T5's un-normalised residual stream, trained LayerNorm gains). For a Post-LN output at init (zero mean,
  unit variance per token) it is the paper's squared change per element.
* Both functions run the model in eval mode (dropout off), so they are deterministic; Admin's profiling pass uses
  training mode instead. Variances include padding positions, as in the official profiling code.

Neither function changes the model: weights are perturbed through `torch.func.functional_call` (the stored
parameters are never written), every module's train/eval flag is restored, nothing is backpropagated (gradients are
left as they were), the global RNG is not used, and every hook is removed, also on error.

References:
    Liyuan Liu, Xiaodong Liu, Jianfeng Gao, Weizhu Chen, Jiawei Han. "Understanding the Difficulty of Training
    Transformers". EMNLP 2020, arXiv:2004.08249 (§4: the dependency β_{i,j} and the output change under a parameter
    perturbation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Mapping

import torch
from torch import nn

from ..admin import OMEGA_NAME, AdminArchitecture, clear_residual_captures, find_residual_sites, resolve_architecture


__all__ = [
    "Amplification",
    "ResidualDependency",
    "SiteAmplification",
    "SiteDependency",
    "branch_parameters",
    "measure_amplification",
    "probe",
    "residual_dependency",
]


# ----------------------------------------------------------------------------------------------- result types


@dataclasses.dataclass
class SiteDependency:
    """β of one residual sublayer.

    Attributes:
        stack (`str`): `"encoder"` or `"decoder"`.
        index (`int`): 1-based position of the sublayer in its stack, in forward order.
        kind (`str`): `"attention"`, `"cross_attention"` or `"ffn"`.
        name (`str`): the norm module of the sublayer (where Admin keeps ω).
        omega (`float` or `None`): mean of Admin's ω (T5: the branch gain g) at this site; `None` without Admin.
        var_residual (`float`): Var[ω_i ⊙ x_{i-1}], the shortcut term of the sum.
        var_branch (`float`): Var[F_i], the branch term of the sum.
        var_sum (`float`): Var[b_i], the residual sum.
        dependency (`float`): β_{i,i}² = var_branch / var_sum.
    """

    stack: str
    index: int
    kind: str
    name: str
    omega: float | None
    var_residual: float
    var_branch: float
    var_sum: float
    dependency: float

    @property
    def beta(self) -> float:
        """β_{i,i} = √(Var[F_i] / Var[b_i])."""
        return math.sqrt(self.dependency)


@dataclasses.dataclass
class ResidualDependency:
    """Result of [`residual_dependency`]: one [`SiteDependency`] per residual sublayer, in forward order."""

    model_type: str
    wiring: str
    sites: list[SiteDependency]

    def dependencies(self, stack: str | None = None) -> list[float]:
        """β_{i,i}² per sublayer (optionally of one stack), in forward order."""
        return [s.dependency for s in self.sites if stack is None or s.stack == stack]

    def summary(self) -> dict[str, float]:
        """`clinic/dependency_mean|max` over all sublayers, for logs."""
        values = self.dependencies()
        return {"clinic/dependency_mean": sum(values) / len(values), "clinic/dependency_max": max(values)}

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "wiring": self.wiring,
            "sites": [dataclasses.asdict(s) for s in self.sites],
        }


@dataclasses.dataclass
class SiteAmplification:
    """Output change after one residual sublayer (or at a stack output, where `kind == "output"`).

    Attributes:
        stack, index, kind, name: as in [`SiteDependency`]; for a stack output `index` is the number of sublayers
            of the stack plus one and `name` the stack module.
        change (`float`): ‖y(W + δ) − y(W)‖² / ‖y(W)‖² at this point.
        amplification (`float`): `change / eps²`.
    """

    stack: str
    index: int
    kind: str
    name: str
    change: float
    amplification: float


@dataclasses.dataclass
class Amplification:
    """Result of [`measure_amplification`].

    Attributes:
        model_type (`str`), wiring (`str`), eps (`float`), seed (`int`).
        sites (`list[SiteAmplification]`): per residual sublayer, in forward order (encoder before decoder).
        outputs (`dict[str, SiteAmplification]`): per stack, the change of the stack's output (its last hidden state).
        total (`SiteAmplification`): the change of the model output F(x, W): the last stack's output.
        num_perturbed (`int`): number of parameter tensors perturbed.
    """

    model_type: str
    wiring: str
    eps: float
    seed: int
    sites: list[SiteAmplification]
    outputs: dict[str, SiteAmplification]
    total: SiteAmplification
    num_perturbed: int

    def amplifications(self, stack: str | None = None) -> list[float]:
        """Amplification after each sublayer (optionally of one stack), in forward order."""
        return [s.amplification for s in self.sites if stack is None or s.stack == stack]

    def summary(self) -> dict[str, float]:
        """`clinic/amplification` (model output) and `clinic/amplification_<stack>` (stack outputs), for logs."""
        out = {"clinic/amplification": self.total.amplification}
        if len(self.outputs) > 1:
            out.update({f"clinic/amplification_{k}": v.amplification for k, v in self.outputs.items()})
        return out

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "wiring": self.wiring,
            "eps": self.eps,
            "seed": self.seed,
            "num_perturbed": self.num_perturbed,
            "total": dataclasses.asdict(self.total),
            "outputs": {k: dataclasses.asdict(v) for k, v in self.outputs.items()},
            "sites": [dataclasses.asdict(s) for s in self.sites],
        }


# ----------------------------------------------------------------------------------------------- model plumbing


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under DDP/`torch.compile`/PEFT wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model


class _Located:
    """A model resolved against the site table: its base module, stacks, sites and stack-output modules."""

    def __init__(self, model: nn.Module, sites: AdminArchitecture | None = None):
        self.model = unwrap_model(model)
        self.model_type, self.arch = resolve_architecture(self.model, sites)
        self.sites = find_residual_sites(self.model, sites=self.arch)
        self.base = getattr(self.model, "base_model", self.model)
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        self.stack_layers: dict[str, nn.Module] = {}
        self.stack_modules: dict[str, tuple[str, nn.Module]] = {}
        for stack in self.arch.stacks:
            try:
                layers = self.base.get_submodule(stack.layers)
            except AttributeError:
                continue
            self.stack_layers[stack.name] = layers
            parent_path = stack.layers.rsplit(".", 1)[0] if "." in stack.layers else ""
            parent = self.base.get_submodule(parent_path) if parent_path else self.base
            self.stack_modules[stack.name] = (names.get(id(parent), parent_path), parent)

    def omega(self, site) -> float | None:
        omega = site.omega
        return None if omega is None else float(omega.detach().double().mean())


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def _shift_right(labels: torch.Tensor, config) -> torch.Tensor:
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    start = pad if start is None else start
    if start is None:
        raise ValueError("Cannot build decoder inputs: the config has neither decoder_start_token_id nor pad_token_id")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad if pad is not None else 0)


def forward_inputs(located: _Located, batch: Mapping) -> dict:
    """Keyword arguments for `located.base`: the batch on the model's device, without labels, with decoder inputs.

    For encoder-decoder models without `decoder_input_ids`, they are built from `labels` (the model's own
    `prepare_decoder_input_ids_from_labels` when it has one), else from `input_ids` shifted right.
    """
    if not hasattr(batch, "items"):
        raise TypeError(f"batch must be a dict of tensors (as the Trainer's data collator returns), got {type(batch)}")
    model, base = located.model, located.base
    param = next(model.parameters())
    params = inspect.signature(base.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inputs = {}
    for key, value in batch.items():
        if key in ("labels", "label", "label_ids"):
            continue
        if key in params or (takes_any and isinstance(value, torch.Tensor)):
            inputs[key] = _to_device(value, param.device)
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise ValueError(f"batch has no input_ids (keys: {sorted(batch)})")
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        labels = batch.get("labels")
        if labels is not None and isinstance(labels, torch.Tensor):
            labels = labels.to(param.device)
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            inputs["decoder_input_ids"] = (
                prepare(labels=labels) if callable(prepare) else _shift_right(labels, model.config)
            )
        else:
            inputs["decoder_input_ids"] = _shift_right(inputs["input_ids"], model.config)
    return inputs


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration; restores every module's own flag (not just the root's) afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _var(t: torch.Tensor) -> float:
    return float(t.detach().double().var(unbiased=False))


class _Recorder:
    """Hooks that record, per site, the residual sum b_i, the branch F_i and the sublayer output x_i."""

    def __init__(self, located: _Located, want_outputs: bool):
        self.located = located
        self.want_outputs = want_outputs
        self.slots: list[dict] = [{} for _ in located.sites]
        self.stack_out: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        wiring = self.located.arch.wiring
        for k, site in enumerate(self.located.sites):
            slot = self.slots[k]
            if wiring == "branch_gain":
                # T5: the norm's input is the stream x_{i-1}; the entry's output (after Admin's gain) is g ⊙ F.
                self.handles.append(site.norm.register_forward_pre_hook(_record_first_arg(slot, "r")))
                self.handles.append(site.entry.register_forward_hook(_record_output(slot, "f")))
            elif wiring == "residual_arg":
                # Appended after Admin's hook: `input_tensor` is the residual term exactly as it is added (ω ⊙ x).
                self.handles.append(
                    site.entry.register_forward_pre_hook(_record_residual(slot, wiring, "rs"), with_kwargs=True)
                )
                self.handles.append(site.norm.register_forward_pre_hook(_record_first_arg(slot, "b")))
            else:
                # residual_capture: the norm first sees z = x + F (before Admin's mix hook, hence prepend), then
                # b = ω ⊙ x + F. So F = z − x exactly as the layer added it, and the shortcut term is b − F.
                self.handles.append(
                    site.entry.register_forward_pre_hook(_record_residual(slot, wiring, "r"), with_kwargs=True)
                )
                self.handles.append(site.norm.register_forward_pre_hook(_record_first_arg(slot, "z"), prepend=True))
                self.handles.append(site.norm.register_forward_pre_hook(_record_first_arg(slot, "b")))
            if wiring != "branch_gain" and self.want_outputs:
                self.handles.append(site.norm.register_forward_hook(_record_output(slot, "x")))
        if self.want_outputs:
            for name, (_, module) in self.located.stack_modules.items():
                self.handles.append(module.register_forward_hook(_record_stack(self.stack_out, name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        clear_residual_captures(self.located.model)
        return False

    def reset(self):
        for slot in self.slots:
            slot.clear()
        self.stack_out.clear()

    def site_tensors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shortcut term ω⊙x_{i-1}, branch term F_i, sum b_i) of site k from the last forward, in float64."""
        site, slot = self.located.sites[k], self.slots[k]
        wiring = self.located.arch.wiring
        needed = {"branch_gain": ("r", "f"), "residual_arg": ("rs", "b"), "residual_capture": ("r", "z", "b")}[wiring]
        if any(key not in slot for key in needed):
            raise RuntimeError(
                f"Site {site.norm_name} did not run in the forward pass (no decoder inputs? LayerDrop?); cannot measure it."
            )
        if wiring == "branch_gain":
            r, f = slot["r"].detach().double(), slot["f"].detach().double()
            return r, f, r + f  # eval mode: the branch dropout is the identity
        b = slot["b"].detach().double()
        if wiring == "residual_arg":
            rs = slot["rs"].detach().double()
            return rs, b - rs, b
        f = slot["z"].detach().double() - slot["r"].detach().double()
        return b - f, f, b

    def site_output(self, k: int) -> torch.Tensor:
        slot = self.slots[k]
        if self.located.arch.wiring == "branch_gain":
            return (slot["r"].detach() + slot["f"].detach()).double()
        return slot["x"].detach().double()


def _record_first_arg(slot, key):
    def hook(module, args):
        slot[key] = args[0]

    return hook


def _record_residual(slot, wiring, key):
    def hook(module, args, kwargs):
        if wiring == "residual_arg":
            slot[key] = kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]
        else:
            slot[key] = args[0] if args else kwargs["hidden_states"]

    return hook


def _record_output(slot, key):
    def hook(module, args, output):
        slot[key] = output[0] if isinstance(output, tuple) else output

    return hook


def _record_stack(store, name):
    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
        store[name] = hidden

    return hook


def _run(located: _Located, inputs: dict, params: dict | None = None) -> None:
    with torch.no_grad():
        if params is None:
            located.base(**inputs)
        else:
            torch.func.functional_call(located.base, params, args=(), kwargs=inputs, strict=False, tie_weights=True)


# ----------------------------------------------------------------------------------------------- public API


def residual_dependency(
    model: nn.Module, batch: Mapping, *, sites: AdminArchitecture | None = None
) -> ResidualDependency:
    """β_{i,i}² = Var[F_i] / Var[b_i] of every residual sublayer: how much each layer depends on its residual branch.

    A Post-LN layer that relies heavily on its branch (β_{i,i}² near 1/2 or above at every depth) amplifies parameter
    updates into large output changes (see [`measure_amplification`]); Pre-LN and Admin keep β_{i,i}² ≈ 1/i. The
    definitions are in the module docstring. One eval-mode forward pass; the model is left exactly as it was.

    Args:
        model (`PreTrainedModel`):
            A model whose `config.model_type` is in `hf_clinic.admin.ADMIN_ARCHITECTURES` (or described by `sites`),
            with or without Admin. DDP, `torch.compile` and PEFT wrappers are unwrapped.
        batch (`dict`):
            A batch as the data collator returns it (`input_ids`, `attention_mask`, ...; `labels` are only used to
            build decoder inputs for encoder-decoder models). Moved to the model's device.
        sites (`AdminArchitecture`, *optional*): overrides the table entry, as in `apply_admin`.

    Returns:
        [`ResidualDependency`]: one [`SiteDependency`] per sublayer (`dependency` = β_{i,i}², `beta` = β_{i,i}, the
        three variances and ω).

    Raises:
        `ValueError`: unsupported model type (the message lists the supported ones), or a batch without inputs.

    Example:

    ```py
    >>> from hf_clinic.diagnostics import residual_dependency
    >>> dep = residual_dependency(model, batch)
    >>> [round(d, 2) for d in dep.dependencies("encoder")]
    ```

    References:
        Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249, §4.1 and footnote 1.
    """
    located = _Located(model, sites)
    inputs = forward_inputs(located, batch)
    with _eval_mode(located.model), _Recorder(located, want_outputs=False) as rec:
        _run(located, inputs)
        return _dependency(located, rec)


def _dependency(located: _Located, rec: _Recorder) -> ResidualDependency:
    out = []
    for k, site in enumerate(located.sites):
        r, f, b = rec.site_tensors(k)
        var_sum, var_branch = _var(b), _var(f)
        out.append(
            SiteDependency(
                stack=site.stack,
                index=site.index,
                kind=site.kind,
                name=site.norm_name,
                omega=located.omega(site),
                var_residual=_var(r),
                var_branch=var_branch,
                var_sum=var_sum,
                dependency=var_branch / var_sum if var_sum > 0 else float("nan"),
            )
        )
    return ResidualDependency(located.model_type, located.arch.wiring, out)


def branch_parameters(model: nn.Module, *, include_norms: bool = False, sites: AdminArchitecture | None = None):
    """`[(name, parameter)]` perturbed by [`measure_amplification`], in `model.named_parameters()` order."""
    return _branch_parameters(_Located(model, sites), include_norms)


def _branch_parameters(located: _Located, include_norms: bool) -> list[tuple[str, nn.Parameter]]:
    in_layers = {id(p) for layers in located.stack_layers.values() for p in layers.parameters()}
    norm_params = set() if include_norms else {id(p) for s in located.sites for p in s.norm.parameters()}
    out, seen = [], set()
    for name, p in located.model.named_parameters():
        if id(p) in seen or id(p) not in in_layers or id(p) in norm_params:
            continue
        if name.endswith(OMEGA_NAME) or not p.is_floating_point():
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def measure_amplification(
    model: nn.Module,
    batch: Mapping,
    *,
    eps: float = 1e-3,
    seed: int = 0,
    include_norms: bool = False,
    delta: Mapping[str, torch.Tensor] | None = None,
    sites: AdminArchitecture | None = None,
) -> Amplification:
    """The output change |F(x, W) − F(x, W + δ)| under a small random perturbation δ, per layer and in total.

    This is the amplification effect of Liu et al. (2020): a heavy dependency on residual branches turns a small
    parameter update into a large change of the output, O(N) in the number of sublayers for Post-LN against
    O(log N) for Pre-LN and Admin. The exact definitions of δ, the change and the amplification are in the module
    docstring: per sublayer output x_i and for the model output F(x, W),
    `change = ‖y(W+δ) − y(W)‖² / ‖y(W)‖²` and `amplification = change / eps²` with δ_p = eps·rms(W_p)·ξ_p.
    Two eval-mode forward passes, deterministic for a given `seed`; the model is left exactly as it was.

    Args:
        model (`PreTrainedModel`): as in [`residual_dependency`].
        batch (`dict`): as in [`residual_dependency`].
        eps (`float`, *optional*, defaults to `1e-3`):
            Relative size of the perturbation. Small enough for the linear regime in float32; use ≥ 1e-2 for
            bf16/fp16 models (their rounding error is ~1e-3).
        seed (`int`, *optional*, defaults to `0`): seed of the CPU generator that draws ξ.
        include_norms (`bool`, *optional*, defaults to `False`): also perturb the sublayer norms' affine parameters.
        delta (`dict[str, Tensor]`, *optional*):
            An explicit perturbation `{parameter name in model.named_parameters(): δ}` to use instead of the random
            one (e.g. an actual optimizer update). `eps` still scales the reported amplification.
        sites (`AdminArchitecture`, *optional*): overrides the table entry, as in `apply_admin`.

    Returns:
        [`Amplification`]: per-sublayer and per-stack changes and amplifications, and `total` for the model output.

    Raises:
        `ValueError`: unsupported model type, invalid `eps`, unknown names in `delta`, or a batch without inputs.

    Example:

    ```py
    >>> from hf_clinic.diagnostics import measure_amplification
    >>> amp = measure_amplification(model, batch, eps=1e-3)
    >>> amp.total.amplification, amp.amplifications("encoder")[-1]
    ```

    References:
        Liu et al., "Understanding the Difficulty of Training Transformers", arXiv:2004.08249, §4.2.
    """
    return _measure(_Located(model, sites), batch, eps, seed, include_norms, delta)[0]


def probe(
    model: nn.Module,
    batch: Mapping,
    *,
    eps: float = 1e-3,
    seed: int = 0,
    include_norms: bool = False,
    sites: AdminArchitecture | None = None,
) -> tuple[Amplification, ResidualDependency]:
    """[`measure_amplification`] and [`residual_dependency`] from the same two forward passes (the clean pass serves
    both). Same arguments and guarantees as [`measure_amplification`]."""
    return _measure(_Located(model, sites), batch, eps, seed, include_norms, None)


def _measure(located: _Located, batch, eps, seed, include_norms, delta) -> tuple[Amplification, ResidualDependency]:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; expected a small positive float such as 1e-3")
    inputs = forward_inputs(located, batch)
    base_names = {id(p): n for n, p in located.base.named_parameters(remove_duplicate=False)}

    perturbed: dict[str, torch.Tensor] = {}
    if delta is None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        for _, p in _branch_parameters(located, include_norms):
            w = p.detach()
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            rms = float(torch.linalg.vector_norm(w, dtype=acc)) / math.sqrt(max(w.numel(), 1))
            xi = torch.randn(w.shape, generator=generator, dtype=w.dtype)
            perturbed[base_names[id(p)]] = w + (eps * rms) * xi.to(w.device)
    else:
        by_name = dict(located.model.named_parameters(remove_duplicate=False))
        unknown = sorted(set(delta) - set(by_name))
        if unknown:
            raise ValueError(f"delta names parameters the model does not have: {unknown[:5]}")
        for name, d in delta.items():
            p = by_name[name]
            if tuple(d.shape) != tuple(p.shape):
                raise ValueError(f"delta[{name!r}] has shape {tuple(d.shape)}, the parameter {tuple(p.shape)}")
            perturbed[base_names[id(p)]] = p.detach() + d.to(device=p.device, dtype=p.dtype)

    with _eval_mode(located.model), _Recorder(located, want_outputs=True) as rec:
        _run(located, inputs)
        dependency = _dependency(located, rec)
        clean_sites = [rec.site_output(k) for k in range(len(located.sites))]
        clean_stacks = {k: v.detach().double() for k, v in rec.stack_out.items()}
        rec.reset()
        _run(located, inputs, perturbed)
        pert_sites = [rec.site_output(k) for k in range(len(located.sites))]
        pert_stacks = {k: v.detach().double() for k, v in rec.stack_out.items()}

    def change(clean: torch.Tensor, pert: torch.Tensor) -> float:
        denom = float(clean.pow(2).sum())
        return float((pert - clean).pow(2).sum()) / denom if denom > 0 else float("nan")

    eps2 = float(eps) ** 2
    site_results = []
    for k, site in enumerate(located.sites):
        c = change(clean_sites[k], pert_sites[k])
        site_results.append(SiteAmplification(site.stack, site.index, site.kind, site.norm_name, c, c / eps2))
    outputs = {}
    for stack, (module_name, _) in located.stack_modules.items():
        if stack not in clean_stacks:
            continue
        c = change(clean_stacks[stack], pert_stacks[stack])
        n = sum(1 for s in located.sites if s.stack == stack)
        outputs[stack] = SiteAmplification(stack, n + 1, "output", module_name, c, c / eps2)
    if not outputs:
        raise RuntimeError("measure_amplification: no stack output was produced by the forward pass")
    total = outputs[list(outputs)[-1]]
    result = Amplification(
        model_type=located.model_type,
        wiring=located.arch.wiring,
        eps=float(eps),
        seed=int(seed),
        sites=site_results,
        outputs=outputs,
        total=total,
        num_perturbed=len(perturbed),
    )
    return result, dependency
