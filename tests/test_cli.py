"""Issue 7: the `hf-clinic` command line (`report`, `diagnose`): help, outputs and clear errors.

References: PIL's PNG decoder, the files written by a real short Trainer run, and argparse's own `--help` behaviour.
"""

import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image
from tiny_models import classification_batch, minilm_checkpoint_path, tiny_bert, tiny_bert_config
from transformers import GPT2Config, Trainer, TrainingArguments

from hf_clinic.cli import main
from hf_clinic.diagnostics import LOG_NAME, ClinicCallback


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = open(path, "rb").read()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.width > 200 and img.height > 200


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    batch = classification_batch(batch_size=16)
    data = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_steps=3,
        learning_rate=1e-4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=data, callbacks=[ClinicCallback(every=1)])
        trainer.train()
        trainer.save_state()
    return out


# ------------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["diagnose", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-clinic")
    if argv[0] == "report":
        assert "RUN_DIR" in out and "--threshold" in out
    if argv[0] == "diagnose":
        assert "MODEL_OR_CONFIG" in out and "--init" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "hf_clinic.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "report" in proc.stdout and "diagnose" in proc.stdout


# ------------------------------------------------------------------------------------------------ report


def test_report_writes_html_and_images(run_dir, tmp_path, capsys):
    html_path = tmp_path / "r.html"
    rc = main(["report", str(run_dir), "-o", str(html_path), "--images-dir", str(tmp_path / "img"), "--no-progress"])
    assert rc == 0
    assert f"Report written to {html_path}" in capsys.readouterr().out
    page = html_path.read_text()
    assert page.count("src='data:image/png;base64,") == len(os.listdir(tmp_path / "img")) >= 6
    for name in os.listdir(tmp_path / "img"):
        assert_png(tmp_path / "img" / name)


def test_report_default_path_and_progress_bar(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert (run_dir / "clinic_report.html").is_file()
    assert "plots" in captured.err  # tqdm progress bar on stderr


def test_report_from_trainer_state_only(run_dir, tmp_path):
    """A run without ClinicCallback: trainer_state.json alone still gives the training plots."""
    (tmp_path / "trainer_state.json").write_bytes((run_dir / "trainer_state.json").read_bytes())
    assert main(["report", str(tmp_path), "--no-progress"]) == 0
    page = (tmp_path / "clinic_report.html").read_text()
    assert "alt='Loss'" in page and "Not in this run" in page


def test_report_threshold_override(run_dir, tmp_path, capsys):
    out = tmp_path / "t.html"
    assert main(["report", str(run_dir), "-o", str(out), "--threshold", "update_ratio=1e-9", "--no-progress"]) == 0
    assert "Very large updates" in out.read_text()
    assert main(["report", str(run_dir), "--threshold", "nonsense=1", "--no-progress"]) == 2
    assert "Unknown clinic threshold" in capsys.readouterr().err


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "Run directory not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err
    (tmp_path / LOG_NAME).write_text('{"type": "run_start", "step": 0}\n{"type": "log", "st')
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-clinic: error: Corrupt clinic log") and "line 2" in err
    (tmp_path / LOG_NAME).unlink()
    (tmp_path / "trainer_state.json").write_text("{not json")
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "Corrupt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ diagnose


def test_diagnose_a_config_vanilla_vs_admin(tmp_path, capsys):
    config = tiny_bert_config(num_hidden_layers=4)
    config.to_json_file(str(tmp_path / "config.json"))
    rc = main(
        [
            "diagnose",
            str(tmp_path / "config.json"),
            "--init",
            "paper",
            "--batch-size",
            "2",
            "--seq-len",
            "8",
            "-o",
            str(tmp_path / "out"),
            "--json",
            str(tmp_path / "out" / "d.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "β² vanilla" in out and "ampl. admin" in out and "paper init" in out
    assert len([line for line in out.splitlines() if line.startswith("encoder ")]) == 8 + 1  # sublayers + output
    for name in ("amplification.png", "dependency.png"):
        assert_png(tmp_path / "out" / name)
    data = json.loads((tmp_path / "out" / "d.json").read_text())
    assert set(data["arms"]) == {"vanilla", "admin"}
    assert len(data["arms"]["admin"]["dependency"]["sites"]) == 8


def test_diagnose_a_model_type_with_overrides(tmp_path, capsys):
    rc = main(
        [
            "diagnose",
            "t5",
            "--set",
            "num_layers=2",
            "--set",
            "num_decoder_layers=1",
            "--set",
            "d_model=32",
            "--set",
            "d_ff=64",
            "--set",
            "num_heads=2",
            "--set",
            "d_kv=16",
            "--set",
            "vocab_size=64",
            "--batch-size",
            "2",
            "--seq-len",
            "6",
            "-o",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "decoder " in out and "Post-LN only" in out  # T5: the note about branch gains


def test_diagnose_the_real_minilm_checkpoint(tmp_path, capsys):
    rc = main(
        [
            "diagnose",
            minilm_checkpoint_path(),
            "--no-admin",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "-o",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "pretrained weights" in out and "tokenized sample text" in out
    assert len([line for line in out.splitlines() if line.startswith("encoder ")]) == 12 + 1


def test_diagnose_errors(tmp_path, capsys):
    GPT2Config(n_layer=2).to_json_file(str(tmp_path / "gpt2.json"))
    assert main(["diagnose", str(tmp_path / "gpt2.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Unsupported model type 'gpt2'" in err and "bert" in err and "marian" in err
    assert main(["diagnose", str(tmp_path / "nothing-here"), "--no-progress"]) == 2
    assert "neither a local model folder" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main(["diagnose", str(tmp_path / "bad.json"), "--no-progress"]) == 2
    assert "not a JSON config" in capsys.readouterr().err
    assert main(["diagnose", "bert", "--set", "oops", "--no-progress"]) == 2
    assert "Invalid --set setting 'oops'; expected key=value" in capsys.readouterr().err
    assert main(["diagnose", "bert", "--set", "num_hidden_layers=2", "--set", "num_hidden_layers=4"]) == 2
    assert "--set: 'num_hidden_layers' is given twice" in capsys.readouterr().err
    torch.manual_seed(0)
