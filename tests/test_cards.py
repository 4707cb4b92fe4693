"""Model cards: metadata that round-trips through `ModelCardData`, and a body that tells how the model was trained."""

import math

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tiny_models import tiny_bert, tiny_marian
from transformers import TrainingArguments

from hf_clinic.admin import apply_admin
from hf_clinic.cards import (
    MetricResult,
    TrainingRecord,
    admin_summary,
    clipping_summary,
    command_line,
    model_card_data,
    optimizer_summary,
    render_model_card,
)


def _record(**overrides):
    fields = dict(
        model_name="someuser/marian-multi30k",
        task_type="translation",
        dataset_id="bentrevett/multi30k",
        dataset_name="Multi30k en-de",
        results=[
            MetricResult("bleu", 31.25, split="validation"),
            MetricResult("chrf", 58.5, split="validation"),
            MetricResult("bleu", 30.5, split="test"),
        ],
        architecture="MarianMTModel",
        language=["en", "de"],
        license="cc-by-nc-4.0",
        optimizer={
            "name": "radam",
            "family": "radam",
            "optim_args": "rectify_threshold=5",
            "learning_rate": 5e-4,
            "weight_decay": 1e-4,
            "lr_scheduler_type": "linear",
            "warmup_steps": 0,
            "warmup": "none",
            "class": "hf_clinic.optim.radam.RAdam",
            "settings": {"betas": [0.9, 0.98]},
        },
        admin={
            "num_sites": 3,
            "num_trainable": 2,
            "omega_min": 1.5,
            "omega_mean": 1.75,
            "omega_max": 2.0,
            "omega_init": "profile",
            "num_batches": 1,
            "sites": [
                {"site": "enc.0", "omega_init": 1.0, "omega": 1.0, "fixed": True},
                {"site": "enc.1", "omega_init": 1.4, "omega": 1.5, "fixed": False},
                {"site": "dec.1", "omega_init": 1.9, "omega": 2.0, "fixed": False},
            ],
        },
        clipping={
            "policy": "zscore",
            "max_grad_norm": 1.0,
            "clip_rate": 0.125,
            "description": "ZScoreClip()",
            "clip_rate_source": "3 of 24 optimizer steps clipped",
            "by_hf_clinic": True,
        },
        hyperparameters={"seed": 7, "num_beams": 5},
        hardware={
            "processor": "Test CPU",
            "cpu_count": 2,
            "accelerator": "none (CPU)",
            "num_processes": 2,
            "distributed_type": "MULTI_CPU",
        },
        command="accelerate launch --num_processes 2 recipes/translation.py --optim radam",
        export_check="max |Δlogits| = 1e-7",
    )
    fields.update(overrides)
    return TrainingRecord(**fields)


def test_metadata_round_trips_through_model_card_data():
    record = _record()
    card = render_model_card(record)
    reloaded = ModelCard(str(card))  # what `ModelCard.load` makes of the pushed README.md
    expected = model_card_data(record)
    assert reloaded.data.to_dict() == expected.to_dict()
    # ... and through a ModelCardData rebuilt from the parsed YAML alone
    rebuilt = ModelCardData(**reloaded.data.to_dict())
    assert rebuilt.to_dict() == expected.to_dict()

    data = reloaded.data
    assert data.library_name == "transformers"
    assert data.tags[0] == "hf-clinic" and {"radam", "admin", "zscore"} <= set(data.tags)
    assert data.datasets == ["bentrevett/multi30k"] and data.metrics == ["bleu", "chrf"]
    assert data.language == ["en", "de"] and data.license == "cc-by-nc-4.0"
    assert data.model_name == "someuser/marian-multi30k"
    # One model-index entry per (split, metric), values as recorded.
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == {("validation", "bleu"): 31.25, ("validation", "chrf"): 58.5, ("test", "bleu"): 30.5}
    assert all(isinstance(r, EvalResult) and r.task_type == "translation" for r in data.eval_results)
    assert data.hf_clinic == {
        "version": data.hf_clinic["version"],
        "optimizer": "radam",
        "optim_args": "rectify_threshold=5",
        "admin": True,
        "admin_sites": 3,
        "admin_omega_mean": 1.75,
        "clip_policy": "zscore",
        "clip_rate": 0.125,
        "stock_export": True,
    }


def test_body_tells_how_the_model_was_trained():
    text = str(render_model_card(_record()))
    body = text.split("\n---\n", 1)[1]
    for needle in (
        "`radam`",
        'optim_args="rectify_threshold=5"',
        "hf_clinic.optim.radam.RAdam",
        "betas=[0.9, 0.98]",
        "warmup: none",  # the optimizer and its variant
        "3 residual sites",
        "`profile`",
        "[1.500, 2.000]",
        "1 (fixed, keeps the export exact)",  # Admin ω summary
        "`zscore`",
        "Clip rate: 0.125 (3 of 24 optimizer steps clipped)",  # clipping
        "Test CPU",
        "2 process(es) (`MULTI_CPU`)",  # hardware
        "accelerate launch --num_processes 2 recipes/translation.py --optim radam",  # command
        "stock `MarianMTModel` checkpoint",
        "hf-clinic is **not** needed",
        "AutoModelForSeq2SeqLM",  # stock export
        "| test | BLEU | 30.5000 |",
        "arXiv 1908.03265",
        "arXiv 2004.08249",
        "arXiv 2504.02507",
    ):
        assert needle in body, needle


def test_builtin_clipping_is_not_a_tag():
    record = _record(clipping={"policy": "fixed", "max_grad_norm": 1.0, "by_hf_clinic": False})
    data = model_card_data(record)
    assert "fixed" not in data.tags and data.hf_clinic["clip_policy"] == "fixed"


def test_body_warns_when_the_checkpoint_is_not_stock():
    body = str(render_model_card(_record(stock_export=False, task_type="text-classification")))
    assert "not a stock checkpoint" in body and "admin_omega" in body
    assert "hf-clinic is **not** needed" not in body
    assert model_card_data(_record(stock_export=False)).hf_clinic["stock_export"] is False


def test_command_line_redacts_secrets(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cmd = command_line(["recipes/glue.py", "--hub_token", "hf_secret", "--hub_token=hf_secret2", "--lr", "1e-4"])
    assert "hf_secret" not in cmd and cmd.count("REDACTED") == 2
    assert cmd.startswith("python recipes/glue.py ") and cmd.endswith("--lr 1e-4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert command_line(["recipes/glue.py"]).startswith("accelerate launch --num_processes 2 recipes/glue.py")


def test_clipping_summary_counts_clipped_steps():
    args = TrainingArguments(output_dir="unused", max_grad_norm=1.0, report_to="none")
    # Built-in clipping: rate over the logged pre-clip norms, 2 of 4 above 1.0 (hand count).
    history = [{"grad_norm": 0.5}, {"grad_norm": 2.0}, {"grad_norm": 1.0}, {"grad_norm": 1.5}, {"eval_loss": 1.0}]
    summary = clipping_summary(args, history)
    assert summary["policy"] == "fixed" and summary["clip_rate"] == 0.5

    # An hf-clinic schedule: its own whole-run counters win over the per-interval logs.
    class Policy:
        name = "percentile"

    class Schedule:
        policy, num_steps, num_clipped, num_skipped = Policy(), 40, 10, 1

    class Callback:
        schedule = Schedule()

    summary = clipping_summary(args, [{"clip/rate": 1.0, "clip/threshold": 0.7}], Callback())
    assert summary["policy"] == "percentile" and summary["clip_rate"] == 0.25 and summary["skipped_steps"] == 1
    assert summary["last_threshold"] == 0.7


def test_admin_summary_reads_the_trained_omegas():
    model = tiny_marian()
    report = apply_admin(model, omega="closed_form")
    with torch.no_grad():  # pretend training moved ω
        for i, p in enumerate(p for n, p in model.named_parameters() if n.endswith("admin_omega")):
            p.fill_(1.0 + 0.25 * i)
    trained = {
        n[: -len(".admin_omega")]: float(p.detach().mean())
        for n, p in model.named_parameters()
        if n.endswith("admin_omega")
    }
    summary = admin_summary(model, report)
    assert summary["num_sites"] == len(report.sites)
    assert summary["num_trainable"] == len(trained) == sum(not s.fixed for s in report.sites)
    assert math.isclose(summary["omega_mean"], sum(trained.values()) / len(trained))
    assert summary["omega_min"] == min(trained.values()) and summary["omega_max"] == max(trained.values())
    rows = {row["site"]: row for row in summary["sites"]}
    for site in report.sites:
        assert rows[site.name]["omega_init"] == pytest.approx(site.omega)
        assert rows[site.name]["omega"] == (1.0 if site.fixed else trained[site.name])
    assert summary["omega_init"] == "closed_form"
    assert admin_summary(tiny_bert()) is None


def test_optimizer_summary_reports_the_real_optimizer():
    args = TrainingArguments(output_dir="unused", optim="adamw_torch", learning_rate=3e-4, report_to="none")
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98))
    summary = optimizer_summary(args, opt)
    assert summary["name"] == "adamw_torch" and summary["class"] == "torch.optim.adamw.AdamW"
    assert summary["settings"]["betas"] == [0.9, 0.98] and "lr" not in summary["settings"]
    assert summary["learning_rate"] == 3e-4


def test_bad_input():
    with pytest.raises(ValueError, match="not finite"):
        MetricResult("accuracy", float("nan"))
    with pytest.raises(ValueError, match="model_name"):
        _record(model_name="")
    with pytest.raises(FileNotFoundError, match="template"):
        render_model_card(_record(), template_path="/nonexistent/template.md")
