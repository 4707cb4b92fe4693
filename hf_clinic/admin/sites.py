"""Where Admin's residual weight goes, per model family: a table keyed by `config.model_type`.

Admin needs, for every residual sublayer, four things from the model: the module whose *input* is the residual (or
whose *output* is the branch, for T5), the norm module that holds ω, the module that produced the sublayer input (the
export fold scales its output rows), and the linears that read the sublayer input (the fold divides their input
columns; for T5, the output linears whose rows absorb the branch gain). The table stores those as module paths, in the
style of peft's `TRANSFORMERS_MODELS_TO_*_MAPPING` tables and `adaption_prompt`'s per-family records, so a new family
is one entry:

```py
>>> from hf_clinic.admin import ADMIN_ARCHITECTURES
>>> ADMIN_ARCHITECTURES["my-bert-clone"] = ADMIN_ARCHITECTURES["bert"]  # same layer classes, same wiring
```

Every path was read from the transformers 5.23 sources (`models/<family>/modeling_<family>.py`); the families listed
under one wiring share attribute names *and* the order of operations inside the layer (checked at apply time by a
self-test forward, so a family whose layers differ fails loudly instead of being mis-wired).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn


__all__ = [
    "ADMIN_ARCHITECTURES",
    "OMEGA_NAME",
    "AdminArchitecture",
    "ResidualSite",
    "StackSpec",
    "SublayerSpec",
    "find_residual_sites",
    "resolve_architecture",
]

OMEGA_NAME = "admin_omega"
"""Name of Admin's ω parameter on the norm module of each residual sublayer (state-dict keys end with it)."""

Wiring = Literal["residual_arg", "residual_capture", "branch_gain"]


@dataclasses.dataclass(frozen=True)
class SublayerSpec:
    """One residual sublayer of a layer, as module paths relative to the layer.

    Args:
        kind (`str`):
            `"attention"`, `"cross_attention"` or `"ffn"`; used in reports only.
        norm (`str`):
            The norm module that holds `admin_omega`. Post-LN: the norm that consumes the residual sum. T5: the
            sublayer's pre-norm.
        entry (`str`):
            `residual_arg` wiring: the module called as `entry(branch_input, residual)` (BERT's `*SelfOutput`,
            `*Output`). `residual_capture`: the module whose first input is the residual (`self_attn`, `fc1`).
            `branch_gain`: the module whose output is the branch output (`SelfAttention`, `DenseReluDense`).
        fold (`tuple[str, ...]`):
            Post-LN: the linears that read the sublayer input; export divides their input columns by ω. T5: the
            branch's last linear; export scales its output rows by the gain.
        optional (`bool`, *optional*, defaults to `False`):
            The sublayer may be absent (BERT cross-attention exists only with `add_cross_attention=True`).
    """

    kind: str
    norm: str
    entry: str
    fold: tuple[str, ...]
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """One stack (encoder or decoder) of residual sublayers.

    Args:
        name (`str`): `"encoder"` or `"decoder"`; profiling runs one recursion per stack.
        layers (`str`): path of the `nn.ModuleList` of layers, relative to `model.base_model`.
        sublayers (`tuple[SublayerSpec, ...]`): the sublayers of one layer, in forward order.
        input_producers (`tuple[str, ...]`, *optional*, defaults to `()`):
            Candidate paths (relative to `model.base_model`; the first that exists wins) of the affine module whose
            output is the stack's first sublayer input: an embedding LayerNorm, or a projection Linear after it
            (ELECTRA). Empty when that input is a raw embedding sum (Marian), which makes the first ω unexportable
            unless it stays exactly 1.
    """

    name: str
    layers: str
    sublayers: tuple[SublayerSpec, ...]
    input_producers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdminArchitecture:
    """Everything Admin needs to know about one model family.

    Args:
        wiring (`str`):
            * `"residual_arg"`: Post-LN layers whose residual add happens in a module called as
              `module(branch, residual)`; a forward pre-hook scales `residual` by ω (stateless).
            * `"residual_capture"`: Post-LN layers with an inline `residual + branch` followed by a norm; a read-only
              pre-hook on the branch entry records the residual and a pre-hook on the norm turns `r + F` into
              `ω⊙r + F`.
            * `"branch_gain"`: Pre-norm layers (T5); a forward hook scales the branch output by a gain `g` (1 at init).
        stacks (`tuple[StackSpec, ...]`): the stacks; absent ones (an encoder-only T5) are skipped.
    """

    wiring: Wiring
    stacks: tuple[StackSpec, ...]

    @property
    def post_ln(self) -> bool:
        return self.wiring != "branch_gain"


# --- BERT family (modeling_bert.py L283-351 and the identical copies in roberta, camembert, xlm_roberta, electra,
# data2vec_text): `*SelfOutput.forward(hidden_states, input_tensor) = LayerNorm(dropout(dense(h)) + input_tensor)`.
_BERT_SUBLAYERS = (
    SublayerSpec(
        kind="attention",
        norm="attention.output.LayerNorm",
        entry="attention.output",
        fold=("attention.self.query", "attention.self.key", "attention.self.value"),
    ),
    # Decoder-style BERT: K/V read the encoder, so only the query reads this sublayer's input.
    SublayerSpec(
        kind="cross_attention",
        norm="crossattention.output.LayerNorm",
        entry="crossattention.output",
        fold=("crossattention.self.query",),
        optional=True,
    ),
    SublayerSpec(kind="ffn", norm="output.LayerNorm", entry="output", fold=("intermediate.dense",)),
)
_BERT = AdminArchitecture(
    wiring="residual_arg",
    stacks=(
        StackSpec(
            name="encoder",
            layers="encoder.layer",
            sublayers=_BERT_SUBLAYERS,
            # ELECTRA projects the LayerNorm-ed embeddings when embedding_size != hidden_size.
            input_producers=("embeddings_project", "embeddings.LayerNorm"),
        ),
    ),
)

# --- Marian / BART (modeling_marian.py L254-386): inline `residual + dropout(branch)` then a LayerNorm.
_ENC_SUBLAYERS = (
    SublayerSpec(
        kind="attention",
        norm="self_attn_layer_norm",
        entry="self_attn",
        fold=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    SublayerSpec(kind="ffn", norm="final_layer_norm", entry="fc1", fold=("fc1",)),
)
_DEC_SUBLAYERS = (
    _ENC_SUBLAYERS[0],
    SublayerSpec(
        kind="cross_attention",
        norm="encoder_attn_layer_norm",
        entry="encoder_attn",
        fold=("encoder_attn.q_proj",),
    ),
    _ENC_SUBLAYERS[1],
)
_MARIAN = AdminArchitecture(
    wiring="residual_capture",
    stacks=(
        # Marian has no embedding LayerNorm: the first sublayer reads `embed_scale * E[ids] + sinusoids`.
        StackSpec(name="encoder", layers="encoder.layers", sublayers=_ENC_SUBLAYERS),
        StackSpec(name="decoder", layers="decoder.layers", sublayers=_DEC_SUBLAYERS),
    ),
)
# BART: same layers, but `layernorm_embedding` after the position sum makes the first sublayer exportable.
_BART = AdminArchitecture(
    wiring="residual_capture",
    stacks=(
        StackSpec(
            name="encoder",
            layers="encoder.layers",
            sublayers=_ENC_SUBLAYERS,
            input_producers=("encoder.layernorm_embedding",),
        ),
        StackSpec(
            name="decoder",
            layers="decoder.layers",
            sublayers=_DEC_SUBLAYERS,
            input_producers=("decoder.layernorm_embedding",),
        ),
    ),
)

# --- T5 family (modeling_t5.py L137-141, L384-432): `h + dropout(branch(layer_norm(h)))`; branches end in `o`/`wo`.
_T5_SELF = SublayerSpec(
    kind="attention", norm="layer.0.layer_norm", entry="layer.0.SelfAttention", fold=("layer.0.SelfAttention.o",)
)
_T5 = AdminArchitecture(
    wiring="branch_gain",
    stacks=(
        StackSpec(
            name="encoder",
            layers="encoder.block",
            sublayers=(
                _T5_SELF,
                SublayerSpec(
                    kind="ffn",
                    norm="layer.1.layer_norm",
                    entry="layer.1.DenseReluDense",
                    fold=("layer.1.DenseReluDense.wo",),
                ),
            ),
        ),
        StackSpec(
            name="decoder",
            layers="decoder.block",
            sublayers=(
                _T5_SELF,
                SublayerSpec(
                    kind="cross_attention",
                    norm="layer.1.layer_norm",
                    entry="layer.1.EncDecAttention",
                    fold=("layer.1.EncDecAttention.o",),
                ),
                SublayerSpec(
                    kind="ffn",
                    norm="layer.2.layer_norm",
                    entry="layer.2.DenseReluDense",
                    fold=("layer.2.DenseReluDense.wo",),
                ),
            ),
        ),
    ),
)

ADMIN_ARCHITECTURES: dict[str, AdminArchitecture] = {
    "bert": _BERT,
    "camembert": _BERT,
    "data2vec-text": _BERT,
    "electra": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "marian": _MARIAN,
    "bart": _BART,
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
}
"""Residual-site table keyed by `config.model_type`. Add an entry to support a family with the same layer layout."""


def resolve_architecture(model: nn.Module, sites: AdminArchitecture | None = None) -> tuple[str, AdminArchitecture]:
    """Return `(model_type, architecture)` for `model`, or raise for an unsupported family.

    Raises:
        `ValueError`: the model has no `config.model_type`, or the type has no entry in [`ADMIN_ARCHITECTURES`] and no
        `sites` override was given. The message lists the supported types and how to add one.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if sites is not None:
        if not isinstance(sites, AdminArchitecture):
            raise TypeError(f"sites must be an AdminArchitecture, got {type(sites).__name__}")
        return model_type or "custom", sites
    if model_type is None:
        raise ValueError(
            f"Admin needs a transformers model with `config.model_type`; got {type(model).__name__}. Pass "
            "`sites=AdminArchitecture(...)` to describe its residual sublayers."
        )
    if model_type not in ADMIN_ARCHITECTURES:
        raise ValueError(
            f"Unsupported model type for Admin: {model_type!r}; supported: {', '.join(sorted(ADMIN_ARCHITECTURES))}. "
            "If its layers are laid out like one of these (same attribute names, same order of operations), add it "
            f"with `hf_clinic.admin.ADMIN_ARCHITECTURES[{model_type!r}] = ADMIN_ARCHITECTURES['bert']` (or pass "
            "`sites=`); otherwise describe it with an `AdminArchitecture`."
        )
    return model_type, ADMIN_ARCHITECTURES[model_type]


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualSite:
    """One residual sublayer of a concrete model, located through [`ADMIN_ARCHITECTURES`].

    Attributes:
        stack (`str`): `"encoder"` or `"decoder"`.
        index (`int`): 1-based position of the sublayer in its stack, in forward order.
        kind (`str`): `"attention"`, `"cross_attention"` or `"ffn"`.
        norm_name (`str`): qualified name of `norm` in the model (the name [`AdminReport`] uses for the site).
        norm (`nn.Module`): Post-LN: the norm that consumes the residual sum `b_i`. T5: the sublayer's pre-norm,
            whose input is the residual stream `x_{i-1}`. Holds `admin_omega` when Admin is applied.
        entry (`nn.Module`): `residual_arg` wiring: the module called as `entry(branch_input, residual)`, whose
            second argument is the residual. `residual_capture`: the branch's first module, whose first input is the
            residual. `branch_gain`: the branch, whose output (first element, for attention) is `F_i`.
        wiring (`str`): `"residual_arg"`, `"residual_capture"` or `"branch_gain"` (see [`AdminArchitecture`]).
    """

    stack: str
    index: int
    kind: str
    norm_name: str
    norm: nn.Module = dataclasses.field(repr=False)
    entry: nn.Module = dataclasses.field(repr=False)
    wiring: str

    @property
    def omega(self) -> nn.Parameter | None:
        """The site's `admin_omega` parameter; `None` without Admin, or for a site fixed at ω = 1 (Marian's first)."""
        return self.norm._parameters.get(OMEGA_NAME)


def find_residual_sites(model: nn.Module, *, sites: AdminArchitecture | None = None) -> list[ResidualSite]:
    """Locate every residual sublayer of `model` (with or without Admin applied), in forward order per stack.

    This is the public view of the table lookup that [`apply_admin`] uses; analysis tools (e.g.
    `hf_clinic.diagnostics`) hook `site.entry` and `site.norm` to observe residuals and branches. Stacks the model
    does not have (the decoder of an encoder-only T5) are skipped; optional sublayers that are absent (BERT
    cross-attention) are left out. Nothing is changed on the model.

    Args:
        model (`PreTrainedModel`): a plain model (unwrap DDP, `torch.compile` and PEFT first) whose
            `config.model_type` is in [`ADMIN_ARCHITECTURES`], or any model described by `sites`.
        sites (`AdminArchitecture`, *optional*): a table entry to use instead of the one for `config.model_type`.

    Returns:
        `list[ResidualSite]`: the encoder's sublayers, then the decoder's.

    Raises:
        `ValueError`: unsupported model type (the message lists the supported ones), or the model lacks a module
        the table names (e.g. a Pre-LN variant with a Post-LN entry).

    Example:

    ```py
    >>> from hf_clinic.admin import find_residual_sites
    >>> [(s.stack, s.index, s.kind) for s in find_residual_sites(model)][:2]
    [('encoder', 1, 'attention'), ('encoder', 2, 'ffn')]
    ```
    """
    from . import _wiring  # _wiring imports this module

    model_type, arch = resolve_architecture(model, sites)
    return [
        ResidualSite(
            stack=s.stack,
            index=s.index,
            kind=s.kind,
            norm_name=s.norm_name,
            norm=s.norm,
            entry=s.entry,
            wiring=arch.wiring,
        )
        for s in _wiring.find_sites(model, arch, model_type)
    ]
