"""`hf-clinic diagnose`: profile a model on a sample batch, vanilla against Admin.

Loads a model (a checkpoint folder, a `config.json`, or a model type of the Admin site table with config overrides),
builds a sample batch (the checkpoint's tokenizer on a few built-in sentences when there is one, else random token
ids), and measures [`probe`] (amplification and residual dependency) on the model as given and on a copy with
`apply_admin` (profiled on the same batch). The result prints as a table and plots as PNGs.

Admin matters for models trained from scratch: `init="paper"` re-initialises the model the way the paper's
experiments did (`hf_clinic.admin.paper_init`: Xavier-uniform linears, N(0, d^-1/2) embeddings). Under Hugging
Face's default N(0, 0.02²) init the residual branches are tiny, both arms look alike, and Admin's ω stay ≈ 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..admin import ADMIN_ARCHITECTURES, AdminReport, apply_admin, has_admin, paper_init
from ..admin.sites import resolve_architecture
from .measures import Amplification, ResidualDependency, _Located, _measure


__all__ = ["DiagnoseResult", "build_sample_batch", "diagnose_model", "load_model"]

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "Deep Post-LN Transformers are hard to train without a careful warmup.",
    "A small change of the weights can move the output of a deep network a lot.",
    "Admin rescales each residual connection so that training starts stable.",
    "Two cyclists crossed the old stone bridge just before the storm arrived.",
    "The committee will publish its final report early next spring.",
    "Learning rates that are too large make the loss explode within a few steps.",
    "She read the letter twice, folded it carefully, and put it in a drawer.",
)


@dataclasses.dataclass
class DiagnoseResult:
    """Vanilla vs Admin profile of one model on one batch.

    Attributes:
        model_type (`str`), description (`str`: what was loaded and how it was initialised).
        vanilla (`tuple[Amplification, ResidualDependency]`): the model as loaded.
        admin (`tuple[Amplification, ResidualDependency]` or `None`): the Admin copy; `None` for a model that already
            carries Admin (then `vanilla` is that model) or when Admin was not requested.
        admin_report (`AdminReport` or `None`): the ω that `apply_admin` chose.
        notes (`list[str]`): caveats to show the user.
        first_arm (`str`): name of the first arm: `"vanilla"`, or `"admin"` for an Admin checkpoint.
    """

    model_type: str
    description: str
    vanilla: tuple[Amplification, ResidualDependency]
    admin: tuple[Amplification, ResidualDependency] | None
    admin_report: AdminReport | None
    notes: list[str]

    first_arm: str = "vanilla"

    def arms(self) -> list[tuple[str, Amplification, ResidualDependency]]:
        """`[(name, amplification, dependency)]`: the model as given, then the Admin copy if any."""
        out = [(self.first_arm, *self.vanilla)]
        if self.admin is not None:
            out.append(("admin", *self.admin))
        return out

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "description": self.description,
            "notes": self.notes,
            "arms": {
                name: {"amplification": amp.to_dict(), "dependency": dep.to_dict()} for name, amp, dep in self.arms()
            },
        }

    def table(self) -> str:
        """A fixed-width text table: one row per residual sublayer, then one per stack output."""
        arms = self.arms()
        names = [a[0] for a in arms]
        head = f"{'stack':8} {'#':>3} {'kind':15}"
        if self.admin_report is not None:
            head += f" {'ω(admin)':>9}"
        head += "".join(f" {'β² ' + n:>13}" for n in names) + "".join(f" {'ampl. ' + n:>14}" for n in names)
        rows = [head, "-" * len(head)]
        omegas = {(s.stack, s.index): s.omega for s in self.admin_report.sites} if self.admin_report else {}
        for k, site in enumerate(arms[0][2].sites):
            row = f"{site.stack:8} {site.index:3d} {site.kind:15}"
            if self.admin_report is not None:
                row += f" {omegas.get((site.stack, site.index), float('nan')):9.3f}"
            row += "".join(f" {dep.sites[k].dependency:13.3f}" for _, _, dep in arms)
            row += "".join(f" {amp.sites[k].amplification:14.4g}" for _, amp, _ in arms)
            rows.append(row)
        rows.append("-" * len(head))
        for stack in arms[0][1].outputs:
            label = f"{stack:8} {'out':>3} {'(stack output)':15}" + (" " * 10 if self.admin_report else "")
            sums = "".join(f" {sum(dep.dependencies(stack)):13.3f}" for _, _, dep in arms)
            amps = "".join(f" {amp.outputs[stack].amplification:14.4g}" for _, amp, _ in arms)
            rows.append(label + sums + amps)
        rows.append("(stack-output rows: β² column = Σ β² over the stack, which the output change is proportional to)")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ loading


def _has_weights(path: str) -> bool:
    names = os.listdir(path)
    return any(n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in names)


def load_model(
    model_or_config: str, *, overrides: Mapping | None = None, init: str = "as-is"
) -> tuple[nn.Module, str, str | None]:
    """Load what `hf-clinic diagnose` was given. Returns `(model, description, tokenizer_path_or_None)`.

    Args:
        model_or_config (`str`): a checkpoint folder (weights are loaded), a folder with only `config.json` or a
            path to a config JSON file (random init), or a model type of the Admin table (`bert`, `marian`, `t5`, ...)
            with its default config.
        overrides (`dict`, *optional*): config attributes to set (e.g. `{"num_hidden_layers": 18}`).
        init (`str`, *optional*, defaults to `"as-is"`): `"as-is"`, or `"paper"` to re-initialise with
            `paper_init` (the from-scratch setting of the paper).

    Raises:
        `FileNotFoundError`, `ValueError`: not a path nor a supported model type; unsupported model type (the message
        lists the supported ones); invalid `init`.
    """
    from transformers import AutoConfig, AutoModel

    if init not in ("as-is", "paper"):
        raise ValueError(f"Invalid init {init!r}; valid values: 'as-is', 'paper'")
    overrides = dict(overrides or {})
    tokenizer_path = None
    if os.path.isdir(model_or_config):
        if not os.path.isfile(os.path.join(model_or_config, "config.json")):
            raise FileNotFoundError(f"{model_or_config} has no config.json: not a transformers model folder")
        config = AutoConfig.from_pretrained(model_or_config, **overrides)
        _check_supported(config)
        if _has_weights(model_or_config) and not overrides:
            if getattr(config, "admin", None):
                from ..admin import load_admin

                model = load_admin(model_or_config)
                model = getattr(model, "base_model", model)
            else:
                model = AutoModel.from_pretrained(model_or_config)
            description = f"{model_or_config} (pretrained weights)"
        else:
            model = AutoModel.from_config(config)
            description = f"{model_or_config} (config only, random init)"
        tokenizer_path = model_or_config
    elif os.path.isfile(model_or_config):
        try:
            with open(model_or_config, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{model_or_config} is not a JSON config file: {err}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"{model_or_config} has no 'model_type': not a transformers config.json")
        model_type = data.pop("model_type")
        _check_supported_type(model_type)
        data.update(overrides)
        config = AutoConfig.for_model(model_type, **data)
        model = AutoModel.from_config(config)
        description = f"{model_or_config} (config, random init)"
    elif model_or_config in ADMIN_ARCHITECTURES:
        config = AutoConfig.for_model(model_or_config, **overrides)
        model = AutoModel.from_config(config)
        description = f"{model_or_config} default config (random init)"
    else:
        raise FileNotFoundError(
            f"{model_or_config!r} is neither a local model folder, a config JSON file, nor a supported model type "
            f"({', '.join(sorted(ADMIN_ARCHITECTURES))}). Hub ids are not fetched: download the model first."
        )
    if overrides:
        description += ", " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    if init == "paper":
        if has_admin(model):
            raise ValueError("init='paper' re-initialises the weights; it makes no sense on an Admin checkpoint")
        paper_init(model)
        description += ", paper init (Xavier linears, N(0, d^-1/2) embeddings)"
    model.eval()
    return model, description, tokenizer_path


def _check_supported_type(model_type: str) -> None:
    if model_type not in ADMIN_ARCHITECTURES:
        raise ValueError(
            f"Unsupported model type {model_type!r}; hf-clinic diagnose supports the Admin site table: "
            f"{', '.join(sorted(ADMIN_ARCHITECTURES))}."
        )


def _check_supported(config) -> None:
    _check_supported_type(getattr(config, "model_type", None))


def build_sample_batch(
    model: nn.Module, tokenizer_path: str | None = None, *, batch_size: int = 8, seq_len: int = 32, seed: int = 0
) -> tuple[dict, str]:
    """A sample batch and how it was made: the tokenizer at `tokenizer_path` on built-in sentences if it loads
    (`"tokenized sample text"`), else `"random token ids"`.

    Random ids avoid the first few ids (special tokens in most vocabularies). Encoder-decoder models get `labels`
    (the same kind of ids), from which the decoder inputs are built.
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"Invalid sample batch shape ({batch_size}, {seq_len}); need batch_size >= 1, seq_len >= 2")
    config = model.config
    if tokenizer_path is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception:  # noqa: BLE001 - no tokenizer in the folder: fall back to random ids
            tokenizer = None
        if tokenizer is not None:
            text = [SAMPLE_TEXT[i % len(SAMPLE_TEXT)] for i in range(batch_size)]
            batch = dict(
                tokenizer(text, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
            )
            if getattr(config, "is_encoder_decoder", False):
                batch["labels"] = batch["input_ids"].clone()
            return batch, "tokenized sample text"
    generator = torch.Generator().manual_seed(seed)
    vocab = int(config.vocab_size)
    low = min(5, vocab - 1)
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        batch["labels"] = torch.randint(low, vocab, (batch_size, seq_len), generator=generator)
    return batch, "random token ids"


# ------------------------------------------------------------------------------------------------ profile


def diagnose_model(
    model: nn.Module,
    batch: Mapping,
    *,
    description: str = "",
    eps: float = 1e-3,
    seed: int = 0,
    omega: str | float = "profile",
    admin: bool = True,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> DiagnoseResult:
    """Measure amplification and residual dependency of `model` as given and of an Admin copy, on `batch`.

    Args:
        model (`PreTrainedModel`): any model of the Admin site table; not modified.
        batch (`dict`): the sample batch (see [`build_sample_batch`]).
        description (`str`, *optional*): shown in outputs.
        eps (`float`, *optional*, defaults to `1e-3`), seed (`int`, *optional*, defaults to `0`): as in
            `measure_amplification`.
        omega (`str` or `float`, *optional*, defaults to `"profile"`): Admin's ω for the copy (`apply_admin`).
        admin (`bool`, *optional*, defaults to `True`): also profile the Admin copy.
        progress (`callable`, *optional*): wraps the list of steps, e.g. `tqdm`.

    Returns:
        [`DiagnoseResult`].
    """
    model_type, arch = resolve_architecture(model)
    notes: list[str] = []
    already = has_admin(model)
    if already:
        notes.append("The model already carries Admin (an Admin checkpoint); it is profiled as it is.")
        admin = False
    elif not arch.post_ln and admin:
        notes.append(
            "T5-style (pre-norm) model: Admin's residual ω is defined for Post-LN only; hf-clinic's Admin-T5 branch "
            "gains start at exactly 1, so both arms are identical at initialisation."
        )
    if admin and not already and "pretrained" in description:
        notes.append(
            "Admin is a from-scratch technique: on pretrained weights its ω != 1 changes the pretrained function, so "
            "the Admin column shows what Admin would do at this init, not a model you would fine-tune."
        )
    results: dict[str, tuple] = {}
    admin_report = None

    def run_vanilla():
        results["vanilla"] = _measure(_Located(model), batch, eps, seed, False, None)

    def run_admin():
        nonlocal admin_report
        twin = copy.deepcopy(model)
        admin_report = apply_admin(twin, [batch], omega=omega)
        results["admin"] = _measure(_Located(twin), batch, eps, seed, False, None)

    steps = [run_vanilla] + ([run_admin] if admin else [])
    for step in progress(steps) if progress else steps:
        step()
    vanilla = results["vanilla"]
    dep = vanilla[1]
    if arch.post_ln and max(dep.dependencies()) < 0.01:
        notes.append(
            "Every residual branch is tiny (β² < 0.01): typical of Hugging Face's N(0, 0.02²) init. Admin matters for "
            "models trained from scratch with a larger init; try --init paper to see that setting."
        )
    return DiagnoseResult(
        model_type, description, vanilla, results.get("admin"), admin_report, notes, "admin" if already else "vanilla"
    )


def plot_diagnosis(result: DiagnoseResult, out_dir: str) -> list[str]:
    """Write `amplification.png` and `dependency.png` (vanilla vs Admin per sublayer) to `out_dir`; return paths."""
    from .report import BLUE, GREY, ORANGE, _pyplot

    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    colors = {"vanilla": BLUE, "admin": ORANGE}
    arms = result.arms()
    stacks = list(dict.fromkeys(s.stack for s in arms[0][2].sites))
    paths = []
    for key, title, ylabel in (
        ("amplification", "Amplification after each residual sublayer", "amplification (log scale)"),
        ("dependency", "Residual dependency β²ᵢ,ᵢ = Var[Fᵢ]/Var[bᵢ]", "β² (branch share)"),
    ):
        fig, axes = plt.subplots(1, len(stacks), figsize=(5.2 * len(stacks), 3.8), squeeze=False)
        for ax, stack in zip(axes[0], stacks, strict=False):
            for name, amp, dep in arms:
                if key == "amplification":
                    sites = [s for s in amp.sites if s.stack == stack]
                    ys = [s.amplification for s in sites]
                    label = f"{name}: output {amp.outputs[stack].amplification:.3g}" if stack in amp.outputs else name
                else:
                    sites = [s for s in dep.sites if s.stack == stack]
                    ys = [s.dependency for s in sites]
                    label = f"{name}: Σβ² = {sum(ys):.2f}"
                ax.plot(
                    [s.index for s in sites], ys, marker="o", ms=3, lw=1.8, color=colors.get(name, GREY), label=label
                )
            if key == "dependency":
                n = sum(1 for s in arms[0][2].sites if s.stack == stack)
                ax.plot(
                    range(1, n + 1), [1 / i for i in range(1, n + 1)], ls="--", lw=1, color=GREY, label="1/i (Pre-LN)"
                )
                ax.set_ylim(0, 1.02)
            else:
                ax.set_yscale("symlog", linthresh=0.01)
            ax.set_title(f"{stack}")
            ax.set_xlabel("residual sublayer")
            ax.set_ylabel(ylabel)
            ax.legend()
        wrapped = "\n".join(textwrap.wrap(result.description, 110))
        fig.suptitle(f"{title}\n{wrapped}", fontsize=9.5)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
        plt.close(fig)
        paths.append(path)
    return paths
