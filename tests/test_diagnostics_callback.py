"""Issue 7: `ClinicCallback` in real `Trainer` runs, its failure signatures, and the HTML report.

Each signature is checked on a real run that exhibits it and on a run that does not. References: update-to-weight
ratios computed by a separate test callback from the weights before and after the step, a training run without the
clinic (for "no interference"), PIL's PNG decoder, and hand-written log lines for the log reader.
"""

import base64
import io
import json
import math
import re
import warnings

import pytest
import torch
from PIL import Image
from tiny_models import classification_batch, tiny_bert
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import hf_clinic  # noqa: F401  (registers optimizer names such as "radam")
from hf_clinic.admin import AdminCallback, paper_init
from hf_clinic.clipping import ClipAwareCallback
from hf_clinic.diagnostics import (
    LOG_NAME,
    ClinicCallback,
    ClinicLogError,
    ClinicThresholds,
    ClinicWarning,
    read_run,
    write_report,
)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_args(out, **overrides):
    kwargs = dict(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_steps=10,
        learning_rate=1e-4,
        lr_scheduler_type="constant_with_warmup",
        max_grad_norm=100.0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def dataset(n=32, seed=1, seq_len=12):
    batch = classification_batch(batch_size=n, seq_len=seq_len, generator=torch.Generator().manual_seed(seed))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def deep_post_ln():
    """A from-scratch deep Post-LN BERT (the paper's init): 24 residual sublayers."""
    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=12, hidden_size=32, intermediate_size=128, num_attention_heads=4)
    paper_init(model)
    return model


def train(model, args, *callbacks, data=None):
    trainer = Trainer(model=model, args=args, train_dataset=data or dataset(), callbacks=list(callbacks))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClinicWarning)
        trainer.train()
    trainer.clinic_warnings = [w for w in caught if issubclass(w.category, ClinicWarning)]
    return trainer


def codes(callback):
    return {f.code for f in callback.findings}


def records(run_dir):
    with open(run_dir / LOG_NAME) as f:
        return [json.loads(line) for line in f]


class RatioProbe(TrainerCallback):
    """Independent reference: ‖W_after − W_before‖ / ‖W_before‖ of `encoder.0`'s matrices at every step."""

    def __init__(self, model):
        self.params = [p for n, p in model.named_parameters() if ".encoder.layer.0." in n and p.ndim >= 2]
        self.ratios = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = [p.detach().clone() for p in self.params]

    def on_optimizer_step(self, args, state, control, **kwargs):
        num = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(self.params, self.before, strict=True))
        den = sum(float(b.pow(2).sum()) for b in self.before)
        self.ratios[state.global_step + 1] = math.sqrt(num / den)


# ------------------------------------------------------------------------------------------------ a run with every signature


@pytest.fixture(scope="module")
def sick_run(tmp_path_factory):
    """Deep Post-LN from scratch, AdamW at 3e-3 without warmup, clip threshold far below the gradient norms."""
    out = tmp_path_factory.mktemp("sick")
    model = deep_post_ln()
    ratio_probe = RatioProbe(model)
    # Short windows keep the run short: 4 early steps, clip rate over 10 steps.
    clinic = ClinicCallback(every=4, update_ratio_every=5, thresholds=ClinicThresholds(early_steps=4, clip_window=10))
    args = make_args(out, max_steps=12, learning_rate=3e-3, max_grad_norm=0.05, optim="adamw_torch")
    trainer = train(model, args, clinic, ratio_probe)
    return trainer, clinic, ratio_probe, out


def test_sick_run_exhibits_each_signature_once(sick_run):
    trainer, clinic, _, _ = sick_run
    assert codes(clinic) == {"amplification", "update_spike", "clip_saturation"}
    by_code = {f.code: f for f in clinic.findings}
    assert by_code["amplification"].step == 0  # seen before the first update
    assert by_code["amplification"].evidence["amplification"] >= 10
    assert by_code["update_spike"].step == 1
    assert by_code["clip_saturation"].step == 10  # the first step with a full 10-step window
    assert "AdminCallback" in by_code["amplification"].remedy
    assert "RAdam" in by_code["update_spike"].remedy and "warmup" in by_code["update_spike"].remedy
    assert "max_grad_norm" in by_code["clip_saturation"].remedy
    assert len(trainer.clinic_warnings) == 3  # one plain-language warning per finding, not per step


def test_update_ratios_match_an_independent_measurement(sick_run):
    _, _, ratio_probe, out = sick_run
    logged = {r["step"]: r["ratios"] for r in records(out) if r["type"] == "update_ratio"}
    assert sorted(logged) == [1, 2, 3, 4, 5, 10]  # every early step, then every 5th
    for step, ratios in logged.items():
        assert ratios["encoder.0"] == pytest.approx(ratio_probe.ratios[step], rel=1e-6)
    # Adam's first step moves every coordinate by ~lr: the ratio is ~lr / rms(W).
    assert logged[1]["encoder.0"] > 0.01


def test_clinic_metrics_reach_the_trainer_logs_and_the_clinic_log(sick_run):
    trainer, _, _, out = sick_run
    history = [h for h in trainer.state.log_history if "loss" in h]
    first = history[0]
    assert first["clinic/amplification"] >= 10 and 0 < first["clinic/dependency_mean"] < 1
    assert "clinic/update_ratio_max" in first and first["clinic/findings"] >= 1
    # Fresh values only: the probe ran before steps 1, 5, 9 (and at the end).
    assert [h["step"] for h in history if "clinic/amplification" in h] == [1, 5, 9]
    recs = records(out)
    assert recs[0]["type"] == "run_start" and recs[-1]["type"] == "run_end"
    assert [r["step"] for r in recs if r["type"] == "diagnostics"] == [0, 4, 8, 12]
    assert len([r for r in recs if r["type"] == "log" and "loss" in r]) == 12
    assert recs[0]["model_type"] == "bert" and len(recs[0]["sites"]) == 24


def _images(page):
    uris = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'>", page)
    return [(alt, base64.b64decode(data)) for alt, data in uris]


def test_report_renders_from_the_real_run(sick_run, tmp_path):
    _, _, _, out = sick_run
    path = write_report(str(out), str(tmp_path / "report.html"), images_dir=str(tmp_path / "img"))
    page = open(path, encoding="utf-8").read()
    images = _images(page)
    assert {alt for alt, _ in images} >= {
        "Loss",
        "Learning rate",
        "Gradient norm and clipping",
        "Amplification per layer",
        "Residual dependency per layer",
        "Update-to-weight ratios",
    }
    for _, png in images:
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as img:
            img.load()  # decodes the whole image
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    files = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert len(files) == len(images) and all(
        (tmp_path / "img" / f).read_bytes().startswith(PNG_SIGNATURE) for f in files
    )
    for text in ("The output change grows with depth", "AdminCallback", "RAdam", "max_grad_norm"):
        assert text in page
    assert "No Admin in this run" in page  # the ω plot says why it is missing


# ------------------------------------------------------------------------------------------------ each signature: with and without


def test_amplification_signature_vanishes_with_admin(tmp_path):
    vanilla = ClinicCallback()
    train(deep_post_ln(), make_args(tmp_path / "v", max_steps=1, learning_rate=1e-6), vanilla)
    admin = ClinicCallback()
    trainer = train(deep_post_ln(), make_args(tmp_path / "a", max_steps=1, learning_rate=1e-6), AdminCallback(), admin)
    assert "amplification" in codes(vanilla)
    assert "amplification" not in codes(admin)
    first = trainer.state.log_history[0]
    assert first["admin/omega_max"] > 2  # Admin's profiled ω was in place when the clinic probed
    assert first["clinic/amplification"] < 0.5 * vanilla.findings[0].evidence["amplification"]
    images = dict(_images(open(write_report(str(tmp_path / "a")), encoding="utf-8").read()))
    assert images["Admin ω"].startswith(PNG_SIGNATURE)  # ω during training and per site


@pytest.mark.parametrize("optim", ["adamw_torch", "radam"])
def test_update_spike_signature_absent_with_warmup_or_radam(tmp_path, optim):
    """The sick run (and `test_thresholds_are_configurable`, HF init) show AdamW at lr 1e-3 without warmup firing.
    At the same lr, a warmup or RAdam's rectification keeps the first 10 updates small (RAdam's first is step 6)."""
    clinic = ClinicCallback(every=0)
    warmup = 100 if optim == "adamw_torch" else 0
    train(tiny_bert(), make_args(tmp_path, optim=optim, learning_rate=1e-3, warmup_steps=warmup), clinic)
    assert "update_spike" not in codes(clinic)
    assert len(read_run(str(tmp_path)).of_type("update_ratio")) == 10
    if optim == "radam":  # RAdam's own telemetry (ρ_t, rectification) is plotted
        images = dict(_images(open(write_report(str(tmp_path)), encoding="utf-8").read()))
        assert images["Optimizer telemetry"].startswith(PNG_SIGNATURE)


SHORT_CLIP = ClinicThresholds(clip_window=6)


def test_clip_saturation_from_clip_aware_callback_rate(tmp_path):
    """`clip/rate` from ClipAwareCallback covers every step between two logs, not only the logged one."""
    clinic = ClinicCallback(every=0, update_ratio_every=0, thresholds=SHORT_CLIP)
    trainer = train(
        tiny_bert(),
        make_args(tmp_path, max_steps=6, logging_steps=3, max_grad_norm=0.0),
        ClipAwareCallback("fixed", max_norm=1e-3),
        clinic,
    )
    assert [h["clip/rate"] for h in trainer.state.log_history if "clip/rate" in h] == [1.0, 1.0]
    finding = next(f for f in clinic.findings if f.code == "clip_saturation")
    assert finding.step == 6 and finding.evidence["threshold"] == pytest.approx(1e-3)


class BreakWeights(TrainerCallback):
    """Puts a NaN into the classifier after step 2, as an fp16 overflow would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                model.classifier.weight[0, 0] = float("nan")


HEALTHY = dict(max_steps=5, warmup_steps=3, learning_rate=1e-4, max_grad_norm=1e3)


@pytest.fixture(scope="module")
def healthy_runs(tmp_path_factory):
    """The same healthy run (warmup, sane clipping, dropout on) with a clinic probing at every step, and without."""
    out = tmp_path_factory.mktemp("healthy")
    torch.manual_seed(0)
    plain_model = tiny_bert()
    plain = train(plain_model, make_args(tmp_path_factory.mktemp("plain"), **HEALTHY))
    torch.manual_seed(0)
    model = tiny_bert()
    # A 4-step clip window, so that "no clip saturation" is checked on this 5-step run (max_grad_norm=1e3).
    clinic = ClinicCallback(every=1, update_ratio_every=1, thresholds=ClinicThresholds(clip_window=4))
    trainer = train(model, make_args(out, **HEALTHY), clinic)
    return (plain, plain_model), (trainer, model, clinic, out)


def test_healthy_run_has_no_findings_and_the_report_says_so(healthy_runs):
    """No amplification (HF init: tiny branches), no early spike (lr 1e-4, warmup), no clip saturation (rate 0)."""
    _, (trainer, _, clinic, out) = healthy_runs
    assert clinic.findings == [] and trainer.clinic_warnings == []
    assert read_run(str(out)).of_type("diagnostics")[0]["amplification"]["total"]["amplification"] < 0.1
    page = open(write_report(str(out)), encoding="utf-8").read()
    assert "No known failure signature" in page


def test_the_clinic_does_not_change_training(healthy_runs):
    """Probing at every step (eval-mode forwards, weight copies) leaves the trajectory bit-identical."""
    (plain, plain_model), (trainer, model, _, _) = healthy_runs
    losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == losses
    weights = plain_model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.training  # the Trainer's train mode survived the eval-mode probes


def test_non_finite_signature(tmp_path, healthy_runs):
    broken = ClinicCallback(every=0, update_ratio_every=0)
    train(tiny_bert(), make_args(tmp_path, max_steps=3), BreakWeights(), broken)
    finding = next(f for f in broken.findings if f.code == "non_finite")
    assert finding.severity == "error" and finding.step == 3
    assert "non_finite" not in codes(healthy_runs[1][2])


# ------------------------------------------------------------------------------------------------ resume, models


def test_resume_appends_and_reads_like_one_run(tmp_path):
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3)
    torch.manual_seed(0)
    train(tiny_bert(), args, ClinicCallback(every=2))
    torch.manual_seed(0)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset(), callbacks=[ClinicCallback(every=2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClinicWarning)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    raw = records(tmp_path)
    assert [r["resumed_from"] for r in raw if r["type"] == "run_start"] == [0, 3]
    run = read_run(str(tmp_path))
    assert [h["step"] for h in run.train_logs()] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in run.of_type("diagnostics")] == [0, 2, 4, 6]  # 4, 6: from the resumed run
    assert len(run.of_type("run_end")) == 1


def test_model_outside_the_site_table_still_gets_logs_and_update_ratios(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=32))
    data = [{"input_ids": d["input_ids"], "labels": d["input_ids"]} for d in dataset()]
    clinic = ClinicCallback()
    train(model, make_args(tmp_path, max_steps=3), clinic, data=data)
    run = read_run(str(tmp_path))
    assert "gpt2" in run.run_start["probe_off"] and run.of_type("diagnostics") == []
    assert set(run.of_type("update_ratio")[0]["ratios"]) >= {"transformer.h.0", "transformer.h.1"}
    page = open(write_report(str(tmp_path)), encoding="utf-8").read()
    assert "Unsupported model type" in page


# ------------------------------------------------------------------------------------------------ bad input, log reader


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": -1}, "Invalid every"),
        ({"update_ratio_every": 1.5}, "Invalid update_ratio_every"),
        ({"probe_size": 0}, "Invalid probe_size"),
        ({"eps": 0.0}, "Invalid eps"),
        ({"probe_batch": [1, 2]}, "Invalid probe_batch"),
        ({"thresholds": {"clip_rate": 0.9, "bogus": 1}}, r"Unknown clinic threshold.*bogus.*valid: amplification"),
        ({"thresholds": {"clip_rate": 1.5}}, "Invalid clip_rate"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClinicCallback(**kwargs)


def test_thresholds_are_configurable(tmp_path):
    """AdamW at lr 1e-3, no warmup, HF init: the first update is ~5% of the weights (lr / 0.02)."""
    clinic = ClinicCallback(every=0, thresholds=ClinicThresholds(update_ratio=10.0))
    train(tiny_bert(), make_args(tmp_path, max_steps=2, optim="adamw_torch", learning_rate=1e-3), clinic)
    assert "update_spike" not in codes(clinic)
    # The report re-checks the logged ratios, with the run's thresholds or the ones given.
    assert "Very large updates" not in open(write_report(str(tmp_path)), encoding="utf-8").read()
    strict = write_report(str(tmp_path), str(tmp_path / "strict.html"), thresholds=ClinicThresholds())
    assert "Very large updates" in open(strict, encoding="utf-8").read()


def test_log_reader_drops_records_past_a_resume_and_names_corrupt_lines(tmp_path):
    lines = [
        {"type": "run_start", "step": 0, "resumed_from": 0},
        {"type": "log", "step": 1, "loss": 2.0, "learning_rate": 1.0},
        {"type": "log", "step": 2, "loss": 1.5, "learning_rate": 1.0},
        {"type": "run_start", "step": 1, "resumed_from": 1},
        {"type": "log", "step": 2, "loss": 1.4, "learning_rate": 1.0},
    ]
    (tmp_path / LOG_NAME).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = read_run(str(tmp_path))
    assert [(h["step"], h["loss"]) for h in run.train_logs()] == [(1, 2.0), (2, 1.4)]
    (tmp_path / LOG_NAME).write_text(json.dumps(lines[0]) + "\n" + '{"type": "log", "step": 1, "lo')
    with pytest.raises(ClinicLogError, match=r"line 2"):
        read_run(str(tmp_path))
    (tmp_path / LOG_NAME).write_text('{"type": "mystery", "step": 1}\n')
    with pytest.raises(ClinicLogError, match=r"line 1.*expected an object with 'type'"):
        read_run(str(tmp_path))
