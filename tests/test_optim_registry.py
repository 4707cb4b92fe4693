"""The optimizer name table, create_optimizer, list_optimizers and param_groups."""

import dataclasses
import warnings

import pytest
import torch
from tiny_models import tiny_bert, tiny_marian, tiny_t5
from torch import nn
from transformers import Trainer

import hf_clinic
from hf_clinic import OPTIMIZERS, create_optimizer, get_optimizer_info, list_optimizers, param_groups
from hf_clinic.optim import GeneralizedSignSGD, Lamb, Lars, RAdam


REQUIRED_NAMES = {"radam", "lamb", "lars", "gsignsgd", "lamb_nvlamb", "lamb_timm", "lamb_deepspeed", "lamb_optax"}


def test_list_optimizers_has_every_required_name_sorted():
    names = list_optimizers()
    assert REQUIRED_NAMES <= set(names)
    assert names == sorted(names) == sorted(OPTIMIZERS)


def test_entries_are_frozen_and_point_to_our_classes():
    for name, info in OPTIMIZERS.items():
        assert info.name == name == name.lower()
        assert info.optimizer_class in (RAdam, Lamb, Lars, GeneralizedSignSGD)
        assert info.description
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.name = "other"
        with pytest.raises(TypeError):
            info.defaults["lr"] = 1.0  # read-only mapping


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LambDegeneratesToAdamWarning")
@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LarsDegeneratesToSGDWarning")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resolved_defaults_are_what_create_optimizer_builds(name):
    info = get_optimizer_info(name)
    kwargs = {"lr": 1.0} if info.optimizer_class is Lars else {}
    opt = create_optimizer([nn.Parameter(torch.ones(2))], name, **kwargs)
    assert type(opt) is info.optimizer_class
    for key, value in info.resolved_defaults.items():
        if key in ("foreach", "fused", "maximize", "telemetry"):
            continue
        assert opt.defaults[key] == (tuple(value) if isinstance(value, list) else value), key


def test_preset_entries_resolve_to_the_preset_values():
    assert get_optimizer_info("lamb_nvlamb").resolved_defaults["max_grad_norm"] == 1.0
    assert get_optimizer_info("lamb_nvlamb").resolved_defaults["adapt"] == "all"
    assert get_optimizer_info("lamb_deepspeed").resolved_defaults["eps"] == 1e-8
    assert get_optimizer_info("lamb_optax").resolved_defaults["weight_decay"] == 0.0
    assert get_optimizer_info("larc").resolved_defaults["clip_mode"] == "larc"
    assert get_optimizer_info("radam").resolved_defaults["warm_phase"] == "skip"
    assert get_optimizer_info("radam_sgd").resolved_defaults["warm_phase"] == "sgd"


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'; valid names: ") as info:
        create_optimizer([nn.Parameter(torch.ones(2))], "adam")
    for name in list_optimizers():
        assert name in str(info.value)


@pytest.mark.filterwarnings("ignore::hf_clinic.optim.LarsDegeneratesToSGDWarning")
def test_names_are_case_insensitive_and_kwargs_override_entry_defaults():
    p = [nn.Parameter(torch.ones(2))]
    assert isinstance(create_optimizer(p, "LAMB_NVLAMB"), Lamb)
    assert create_optimizer(p, "lamb_nvlamb", max_grad_norm=None).defaults["max_grad_norm"] is None
    assert create_optimizer(p, "larc", lr=1.0, clip_mode=None).defaults["clip_mode"] is None
    assert create_optimizer(p, "radam", lr=5e-4).defaults["lr"] == 5e-4


def test_public_api_exports():
    for name in ("RAdam", "Lamb", "Lars", "GeneralizedSignSGD", "param_groups", "create_optimizer", "list_optimizers"):
        assert name in hf_clinic.__all__
        assert getattr(hf_clinic, name) is not None


# ------------------------------------------------------------------------------------------------ param groups


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("factory", [tiny_bert, tiny_t5, tiny_marian], ids=["bert", "t5", "marian"])
def test_param_groups_match_the_trainer_decay_split(factory):
    torch.manual_seed(0)
    model = factory()
    trainer_decay = set(Trainer.get_decay_parameter_names(None, model))  # the Trainer's own rule (self unused)
    groups = param_groups(model, 0.01)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.01 and decay.get("layer_adaptation", True) is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["layer_adaptation"] is False
    # the Trainer's create_optimizer also keeps only requires_grad params (Marian's sinusoidal positions are frozen)
    named = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _names(model, decay) == trainer_decay & named
    assert _names(model, decay) | _names(model, no_decay) == set(named)
    assert all(p.ndim > 1 for p in decay["params"])


class _AdminNorm(nn.LayerNorm):
    def __init__(self, dim):
        super().__init__(dim)
        self.admin_omega = nn.Parameter(torch.ones(dim))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = _AdminNorm(4)
        self.mixer = nn.Module()
        self.mixer.admin_omega = nn.Parameter(torch.ones(4, 4))  # 2-d, outside any norm: only the name excludes it
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 4, bias=False)
        self.tied = self.head  # shared module: its weight appears once


def test_param_groups_exclude_admin_omega_frozen_params_and_dedup_tied():
    model = _Model()
    decay, no_decay = param_groups(model, 0.1)
    assert _names(model, decay) == {"proj.weight", "head.weight"}
    assert _names(model, no_decay) == {
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "norm.admin_omega",
        "mixer.admin_omega",
    }
    # the Trainer alone would decay the 2-d omega
    assert "mixer.admin_omega" in Trainer.get_decay_parameter_names(None, model)
    n_params = len(decay["params"]) + len(no_decay["params"])
    assert n_params == len({id(p) for p in model.parameters() if p.requires_grad})


def test_param_groups_options():
    model = _Model()
    decay, no_decay = param_groups(model, 0.1, no_decay=[r"^head\."], exclude_1d=False, no_decay_modules=())
    assert _names(model, decay) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert _names(model, no_decay) == {"head.weight", "norm.admin_omega", "mixer.admin_omega"}
    with pytest.raises(ValueError, match="Invalid no_decay pattern: '\\['"):
        param_groups(model, 0.1, no_decay=["["])
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        param_groups(model, -1)
    only_bias = nn.Linear(2, 2)
    only_bias.weight.requires_grad_(False)
    assert [g["weight_decay"] for g in param_groups(only_bias, 0.1)] == [0.0]  # empty groups are omitted


def test_create_optimizer_on_a_module_uses_param_groups():
    model = _Model()
    opt = create_optimizer(model, "lamb", weight_decay=0.05, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert [g.get("layer_adaptation", True) for g in opt.param_groups] == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(model, "lamb")  # default weight decay 0.01: no degeneration warning
    assert [g["weight_decay"] for g in create_optimizer(model, "lamb_optax").param_groups] == [0.0, 0.0]


def test_create_optimizer_refuses_a_zero3_partitioned_model():
    # DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_id`; their local tensors are empty placeholders.
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
    for name in ("radam", "lamb"):
        with pytest.raises(NotImplementedError, match="ZeRO-3"):
            create_optimizer(model, name)
    create_optimizer(list(model.parameters()), "radam")  # explicit params: the caller owns the grouping


def test_lamb_and_lars_honour_layer_adaptation_from_param_groups():
    """The no-decay group of a real model gets no trust ratio, even with adapt='all'."""
    torch.manual_seed(0)
    model = _Model()
    for cls, kwargs, prefix in [(Lamb, {"adapt": "all"}, "lamb"), (Lars, {"lr": 1.0, "adapt": "all"}, "lars")]:
        opt = cls(param_groups(model, 0.01), **kwargs)
        model.zero_grad()
        model.proj(torch.randn(3, 4)).sum().backward()
        model.head(torch.randn(3, 4)).sum().backward()
        opt.step()
        decayed_with_grad = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
        assert len(opt._telemetry_data["ratios"]) >= 1
        n_ratios = sum(r.numel() for r in opt._telemetry_data["ratios"])
        assert n_ratios == len(decayed_with_grad), prefix
