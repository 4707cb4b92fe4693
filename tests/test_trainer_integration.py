"""Issue 3: every hf-clinic optimizer name through `TrainingArguments.optim` and the Trainer (tiny models, in process).

References: transformers' own `Trainer.get_decay_parameter_names`, optimizers built by hand from `param_groups`,
hand-computed RAdam/LAMB/LARS formulas, an uninterrupted run for resume, and argparse's own behaviour.
"""

import json
import math
import statistics
import warnings

import pytest
import torch
from tiny_models import classification_batch, tiny_bert
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
from transformers.training_args import OptimizerNames

import hf_clinic
from hf_clinic import OPTIMIZERS, GeneralizedSignSGD, Lamb, Lars, RAdam, list_optimizers, param_groups
from hf_clinic.integrations import transformers as integ
from hf_clinic.optim import LambDegeneratesToAdamWarning


ADAM_STYLE = (RAdam, Lamb, GeneralizedSignSGD)


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def dataset(n=32, seed=1):
    batch = classification_batch(batch_size=n, generator=torch.Generator().manual_seed(seed))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def no_dropout_bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ------------------------------------------------------------------------------------------------ registration


def test_every_registry_name_is_a_trainer_name():
    assert integ.trainer_optimizer_names() == list(OPTIMIZERS)
    for name in list_optimizers():
        member = OptimizerNames(name)
        assert member.value == name and member == name
        assert _OPTIMIZER_HANDLERS[member] is integ.optimizer_handler
        assert OptimizerNames[name.upper()] is member


def test_registration_is_idempotent():
    members = list(OptimizerNames)
    handlers = dict(_OPTIMIZER_HANDLERS)
    post_init = TrainingArguments.__post_init__
    assert integ.register_trainer_optimizers() == list(OPTIMIZERS)
    assert integ.register_trainer_optimizers() == list(OPTIMIZERS)
    assert list(OptimizerNames) == members
    assert dict(_OPTIMIZER_HANDLERS) == handlers
    assert TrainingArguments.__post_init__ is post_init
    assert not getattr(post_init.__wrapped__, "_hf_clinic_wrapped", False)


def test_builtin_names_are_never_overwritten(monkeypatch):
    sgd_handler = _OPTIMIZER_HANDLERS[OptimizerNames.SGD]
    table = {**OPTIMIZERS, "sgd": hf_clinic.OptimizerInfo("sgd", RAdam, "collides with transformers' sgd")}
    monkeypatch.setattr(integ, "OPTIMIZERS", table)
    with pytest.warns(integ.NameCollisionWarning, match="'sgd' is already a built-in OptimizerNames value"):
        names = integ.register_trainer_optimizers()
    assert "sgd" not in names
    assert _OPTIMIZER_HANDLERS[OptimizerNames.SGD] is sgd_handler
    assert OptimizerNames("sgd") is OptimizerNames.SGD


def test_missing_transformers_internals_fail_clearly(monkeypatch):
    import transformers.trainer_optimizer

    monkeypatch.delattr(transformers.trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(ImportError, match=r"_OPTIMIZER_HANDLERS.*supports transformers>=5\.23,<6"):
        integ.register_trainer_optimizers()


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="radamm is not a valid OptimizerNames") as err:
        make_args(tmp_path, optim="radamm")
    for name in list_optimizers():
        assert f"'{name}'" in str(err.value)


# ------------------------------------------------------------------------------------------------ the handler


def _hyperparameters(group):
    return {k: v for k, v in group.items() if k != "params"}


@pytest.mark.parametrize("name", list_optimizers())
def test_trainer_builds_the_registry_optimizer(name, tmp_path):
    info = OPTIMIZERS[name]
    adam_style = issubclass(info.optimizer_class, ADAM_STYLE)
    extra = dict(adam_beta2=0.98, adam_epsilon=1e-7) if adam_style else {}
    model = tiny_bert()
    trainer = Trainer(
        model=model, args=make_args(tmp_path, optim=name, learning_rate=3e-3, weight_decay=0.05, **extra)
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is info.optimizer_class

    # Built by hand from the same groups, with what the name and TrainingArguments mean.
    by_hand = dict(info.defaults, lr=3e-3, weight_decay=0.05)
    if adam_style:
        by_hand.update(betas=(info.resolved_defaults["betas"][0], 0.98), eps=1e-7)
    reference = info.optimizer_class(param_groups(model, 0.05), **by_hand)
    assert len(optimizer.param_groups) == len(reference.param_groups) == 2
    for ours, ref in zip(optimizer.param_groups, reference.param_groups, strict=True):
        assert [id(p) for p in ours["params"]] == [id(p) for p in ref["params"]]
        assert _hyperparameters(ours) == _hyperparameters(ref)

    # transformers' own notion of "decayed", minus 1-D tensors (hf-clinic also spares those).
    decay_names = set(trainer.get_decay_parameter_names(model))
    expected = {id(p) for n, p in model.named_parameters() if n in decay_names and p.ndim > 1}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == expected
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["layer_adaptation"] is False
    assert optimizer.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lamb", {"eps": 1e-6, "adapt": "decayed", "max_grad_norm": None}),  # LAMB keeps its own eps
        ("lamb_nvlamb", {"max_grad_norm": 1.0, "adapt": "all"}),
        ("lamb_deepspeed", {"eps": 1e-8, "adapt": "all", "ratio_clamp": (0.01, 10.0)}),
        ("lambc", {"trust_clip": 1.0}),
        ("radam", {"warm_phase": "skip", "rectify_threshold": 5.0, "betas": (0.9, 0.999), "eps": 1e-8}),
        ("radam_sgd", {"warm_phase": "sgd"}),
        ("larc", {"clip_mode": "larc", "momentum": 0.9}),
    ],
)
def test_names_keep_their_own_defaults_under_default_training_arguments(name, expected, tmp_path):
    trainer = Trainer(model=tiny_bert(), args=make_args(tmp_path, optim=name, weight_decay=0.01))
    group = trainer.create_optimizer().param_groups[0]
    assert {k: group[k] for k in expected} == expected


def test_adam_fields_are_ignored_by_lars_with_a_warning(tmp_path):
    args = make_args(tmp_path, optim="lars", adam_beta1=0.5, learning_rate=0.1)
    trainer = Trainer(model=tiny_bert(), args=args)
    with pytest.warns(integ.IgnoredTrainingArgumentWarning, match="does not use TrainingArguments adam_beta1"):
        optimizer = trainer.create_optimizer()
    assert optimizer.param_groups[0]["momentum"] == 0.9


# ------------------------------------------------------------------------------------------------ optim_args


def test_optim_args_are_parsed_with_constructor_types(tmp_path):
    args = make_args(
        tmp_path, optim="radam", optim_args="warm_phase=sgd, rectify_threshold=4,beta1=0.8,telemetry=false"
    )
    optimizer = Trainer(model=tiny_bert(), args=args).create_optimizer()
    group = optimizer.param_groups[0]
    assert group["warm_phase"] == "sgd"
    assert group["rectify_threshold"] == 4.0 and isinstance(group["rectify_threshold"], float)
    assert group["betas"] == (0.8, 0.999)
    assert optimizer._telemetry_enabled is False

    args = make_args(tmp_path, optim="lamb", optim_args="max_grad_norm=none,trust_clip=2,adapt=all,foreach=False")
    group = Trainer(model=tiny_bert(), args=args).create_optimizer().param_groups[0]
    assert (group["max_grad_norm"], group["trust_clip"], group["adapt"], group["foreach"]) == (None, 2.0, "all", False)

    args = make_args(tmp_path, optim="lars", optim_args="momentum=0.8,nesterov=true,trust_norm=norm_of_sum")
    group = Trainer(model=tiny_bert(), args=args).create_optimizer().param_groups[0]
    assert (group["momentum"], group["nesterov"], group["trust_norm"]) == (0.8, True, "norm_of_sum")


@pytest.mark.parametrize(
    ("optim", "optim_args", "message", "lists_keys"),
    [
        ("radam", "betas=(0.9,0.99)", r"'0\.99\)' is not a key=value pair.*beta1=0\.9,beta2=0\.98", True),
        ("radam", "telemetry", r"'telemetry' is not a key=value pair", True),
        ("radam", "beta1=0.9,", r"'' is not a key=value pair", True),
        ("radam", "url=a=b", r"'url=a=b' is not a key=value pair", True),
        ("radam", "warmup=5", r"Unknown optim_args key 'warmup' for optim='radam'", True),
        ("lamb", "lr=1e-3", r"'lr' is not accepted.*TrainingArguments\.learning_rate", True),
        ("lars", "weight_decay=0.1", r"'weight_decay' is not accepted.*TrainingArguments\.weight_decay", True),
        ("radam", "rectify_threshold=high", r"rectify_threshold='high'.*\(float\)", True),
        ("lamb", "telemetry=maybe", r"telemetry='maybe'.*expected true or false", True),
        ("radam", "beta1=0.9,beta1=0.8", r"key 'beta1' is given twice", False),
        # Values of the right type that the optimizer itself rejects: its own message, at the same early point.
        ("radam", "warm_phase=adam", r"Invalid warm_phase: 'adam'; valid values: 'skip', 'sgd'", False),
        ("radam", "rectify_threshold=3", r"Invalid rectify_threshold value: 3\.0", False),
        ("lamb", "preset=apex", r"Invalid preset: 'apex'", False),
        ("lars", "clip_mode=larcc", r"Invalid clip_mode: 'larcc'", False),
    ],
)
def test_bad_optim_args_fail_when_the_arguments_are_built(optim, optim_args, message, lists_keys, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        make_args(tmp_path, optim=optim, optim_args=optim_args, learning_rate=0.1)
    if lists_keys:
        for key in integ.optim_args_keys(optim):
            assert key in str(err.value)


def test_bad_optim_args_set_after_construction_fail_in_the_trainer(tmp_path):
    args = make_args(tmp_path, optim="radam").set_optimizer(name="lamb", args="betas=(0.9,0.99)")
    trainer = Trainer(model=tiny_bert(), args=args)
    with pytest.raises(ValueError, match=r"not a key=value pair.*valid keys|Valid keys: beta1"):
        trainer.create_optimizer()


def test_optim_args_and_training_arguments_must_agree(tmp_path):
    with pytest.raises(
        ValueError, match=r"beta2=0\.99 for optim='radam' conflicts with TrainingArguments\.adam_beta2"
    ):
        make_args(tmp_path, optim="radam", adam_beta2=0.98, optim_args="beta2=0.99")
    args = make_args(tmp_path, optim="radam", adam_beta2=0.98, optim_args="beta2=0.98")
    assert Trainer(model=tiny_bert(), args=args).create_optimizer().param_groups[0]["betas"] == (0.9, 0.98)


# ------------------------------------------------------------------------------------------------ serialization, CLI


def test_training_arguments_serialize_and_reload(tmp_path):
    args = make_args(tmp_path, optim="lamb_nvlamb", optim_args="beta2=0.98,telemetry=false", weight_decay=0.01)
    as_dict = args.to_dict()
    assert as_dict["optim"] == "lamb_nvlamb" and type(as_dict["optim"]) is str
    assert json.loads(args.to_json_string())["optim"] == "lamb_nvlamb"
    assert args.to_sanitized_dict()["optim"] == "lamb_nvlamb"

    reloaded = TrainingArguments(**{k: v for k, v in as_dict.items() if k in TrainingArguments.__dataclass_fields__})
    assert reloaded.optim is OptimizerNames.LAMB_NVLAMB and reloaded.optim_args == args.optim_args

    path = tmp_path / "args.json"
    path.write_text(args.to_json_string())
    (from_json,) = HfArgumentParser(TrainingArguments).parse_json_file(str(path), allow_extra_keys=True)
    assert from_json.optim is OptimizerNames.LAMB_NVLAMB


def test_hf_argument_parser_accepts_our_names(tmp_path, capsys):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "lars", "--optim_args", "momentum=0.8", "--learning_rate", "0.5"]
    )
    assert args.optim is OptimizerNames.LARS
    assert integ.trainer_optimizer_kwargs(args) == {"lr": 0.5, "weight_decay": 0.0, "momentum": 0.8}

    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "radamm"])
    err = capsys.readouterr().err
    assert "invalid choice: 'radamm'" in err and "'radam'" in err and "'lamb_nvlamb'" in err


# ------------------------------------------------------------------------------------------------ telemetry


class _Snapshot(TrainerCallback):
    """Parameters and (clipped) gradients right before the optimizer step, by parameter id."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {
                id(p): (p.detach().double().clone(), p.grad.detach().double().clone())
                for p in model.parameters()
                if p.grad is not None
            }
        )


def _summary(ratios):
    return min(ratios), statistics.median(ratios), max(ratios)


def test_radam_telemetry_reaches_the_logs(tmp_path):
    trainer = Trainer(
        model=tiny_bert(),
        args=make_args(tmp_path, optim="radam", max_steps=7, adam_beta2=0.99),
        train_dataset=dataset(),
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == list(range(1, 8))
    beta2 = 0.99
    rho_inf = 2 / (1 - beta2) - 1
    for log in logs:
        t = log["step"]
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        assert log["radam/rho_t"] == pytest.approx(rho_t, rel=1e-9)
        rectified = rho_t > 5
        assert log["radam/rectified"] == float(rectified)
        r_t = (
            math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            if rectified
            else 0
        )
        assert log["radam/rectification"] == pytest.approx(r_t, rel=1e-9)
    assert [log["radam/rectified"] for log in logs] == [0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_trust_ratio_telemetry_matches_a_hand_computation(name, tmp_path):
    wd, eps, trust = 0.01, 1e-6, 1e-3
    snapshot = _Snapshot()
    model = no_dropout_bert()
    args = make_args(tmp_path, optim=name, max_steps=1, weight_decay=wd, learning_rate=0.1, max_grad_norm=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[snapshot])
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]

    # The adapted tensors: decayed ones (2-D weights). Step 1 of LAMB: m_hat = g, v_hat = g^2.
    adapted = {id(p) for p in param_groups(model, wd)[0]["params"]}
    ratios = []
    for pid, (theta, grad) in snapshot.steps[0].items():
        if pid not in adapted:
            continue
        if name == "lamb":
            update = grad / (grad.abs() + eps) + wd * theta
            ratios.append((theta.norm() / update.norm()).item())
        else:
            ratios.append((trust * theta.norm() / (grad.norm() + wd * theta.norm())).item())
    expected = _summary(ratios)
    got = tuple(log[f"{name}/trust_ratio_{k}"] for k in ("min", "median", "max"))
    assert got == pytest.approx(expected, rel=1e-5)


def test_telemetry_can_be_switched_off(tmp_path):
    args = make_args(tmp_path, optim="lamb", weight_decay=0.01, max_steps=2, optim_args="telemetry=false")
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and not any(k.startswith("lamb/") for log in logs for k in log)


def test_lamb_weight_decay_trap_warns_through_the_trainer(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=make_args(tmp_path, optim="lamb"))  # Trainer default weight_decay=0.0
    with pytest.warns(LambDegeneratesToAdamWarning, match="degenerates to Adam"):
        trainer.create_optimizer()
    trainer = Trainer(model=tiny_bert(), args=make_args(tmp_path, optim="lamb", weight_decay=0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LambDegeneratesToAdamWarning)
        trainer.create_optimizer()


# ------------------------------------------------------------------------------------------------ resume


class _RecordingTrainer(Trainer):
    """Records the exact (unrounded) training loss of every step; the logged loss is rounded to 4 digits."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def _run(tmp_path, name, resume=None, **kwargs):
    torch.manual_seed(0)
    args = make_args(
        tmp_path,
        optim=name,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        learning_rate=0.05 if name.startswith("lars") else 3e-3,
        weight_decay=0.01,
        **kwargs,
    )
    trainer = _RecordingTrainer(model=tiny_bert(), args=args, train_dataset=dataset())
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("name", ["radam", "lamb", "lars", "gsignsgd"])
def test_resume_is_bit_exact(name, tmp_path):
    full = _run(tmp_path / "full", name)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed = _run(tmp_path / "resumed", name, resume=str(checkpoint))

    assert len(full.losses) == 6 and len(resumed.losses) == 3
    assert resumed.losses == full.losses[3:]  # exact float equality
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    logs = {log["step"]: log for log in full.state.log_history if "loss" in log}
    for log in (log for log in resumed.state.log_history if "loss" in log):
        assert {k: v for k, v in log.items() if "/" in k} == {k: v for k, v in logs[log["step"]].items() if "/" in k}


# ------------------------------------------------------------------------------------------------ sharded backends


@pytest.mark.parametrize("name", ["lamb", "lars", "radam", "gsignsgd"])
def test_fsdp1_is_refused_and_fsdp2_allowed_by_the_handler(name, tmp_path):
    model = tiny_bert()
    fsdp1 = make_args(tmp_path, optim=name, learning_rate=0.1, fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(NotImplementedError, match=r"not supported under FSDP1.*Use FSDP2"):
        Trainer.get_optimizer_cls_and_kwargs(fsdp1, model)
    fsdp2 = make_args(tmp_path, optim=name, learning_rate=0.1, fsdp=True, fsdp_config={"version": 2})
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(fsdp2, model)
    assert cls is OPTIMIZERS[name].optimizer_class and len(kwargs["params"]) == 2


@pytest.mark.parametrize(
    ("stage", "refused"),
    [(0, set()), (1, {Lamb, Lars}), (2, {Lamb, Lars}), (3, {Lamb, Lars, RAdam, GeneralizedSignSGD})],
)
def test_deepspeed_zero_stages(stage, refused, tmp_path):
    # DeepSpeed is not installed here, so TrainingArguments(deepspeed=...) cannot be built: the config travels in the
    # three forms transformers accepts (dict, JSON string, file path) on a stand-in for the arguments.
    from types import SimpleNamespace

    from hf_clinic.integrations.accelerate import check_sharding_support

    config = {"zero_optimization": {"stage": stage}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for form in (config, json.dumps(config), str(path)):
        args = SimpleNamespace(deepspeed=form, fsdp=None)
        for cls in (Lamb, Lars, RAdam, GeneralizedSignSGD):
            if cls in refused:
                with pytest.raises(NotImplementedError, match=f"{cls.__name__} is not supported under DeepSpeed"):
                    check_sharding_support(cls, args=args)
            else:
                check_sharding_support(cls, args=args)
