"""Issue 3: stock scripts and artifacts, with and without hf_clinic in the process.

* `python -m hf_clinic.launch script.py --optim lamb` runs a stock script (one that never imports hf_clinic);
* the same script started without the launcher is rejected by argparse (the reference behaviour);
* a checkpoint's `training_args.bin` from a run with `optim="radam"` unpickles in a process where importing hf_clinic
  is impossible.

The 2-process form (`accelerate launch -m hf_clinic.launch ...`) runs in `tests/test_accelerate_multiprocess.py`.
"""

import json
import os
import subprocess
import sys

import pytest
from launch_utils import REPO_ROOT
from test_trainer_integration import dataset, make_args
from tiny_models import tiny_bert
from transformers import Trainer
from transformers.training_args import OptimizerNames

from hf_clinic import launch


SCRIPTS = os.path.join(REPO_ROOT, "tests", "scripts")
STOCK = os.path.join(SCRIPTS, "integ_stock_train.py")
TRAIN_ARGS = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--use_cpu",
    "true",
]


def python(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def script_args(tmp_path, optim):
    return [
        "--optim",
        optim,
        "--output_dir",
        str(tmp_path / "out"),
        "--result_dir",
        str(tmp_path / "res"),
        *TRAIN_ARGS,
    ]


@pytest.fixture(scope="module")
def without_hf_clinic(tmp_path_factory):
    """One process that cannot import hf_clinic: loads a training_args.bin, then runs the stock script."""
    tmp_path = tmp_path_factory.mktemp("without")
    args = make_args(
        tmp_path, optim="radam", optim_args="warm_phase=sgd,telemetry=false", learning_rate=1e-3, max_steps=1
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    result = python(
        [
            os.path.join(SCRIPTS, "integ_without_hf_clinic.py"),
            str(tmp_path / "model" / "training_args.bin"),
            STOCK,
            *script_args(tmp_path, "radam"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_args_bin_loads_without_hf_clinic(without_hf_clinic):
    assert without_hf_clinic["hf_clinic_imported"] is False
    assert without_hf_clinic["optim"] == "radam" and without_hf_clinic["optim_type"] == "str"
    assert without_hf_clinic["dict_optim"] == "radam"
    assert without_hf_clinic["optim_args"] == "warm_phase=sgd,telemetry=false"
    assert without_hf_clinic["learning_rate"] == 1e-3


def test_stock_script_rejects_our_names_without_the_launcher(without_hf_clinic):
    assert without_hf_clinic["script_exit_code"] == 2
    assert "invalid choice: 'radam'" in without_hf_clinic["script_stderr"]


def test_launcher_runs_a_stock_script_with_our_names(tmp_path):
    result = python(["-m", "hf_clinic.launch", STOCK, *script_args(tmp_path, "lamb")], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "res" / "rank0.json") as f:
        out = json.load(f)
    assert out["hf_clinic_imported_before_script"] is True
    assert out["optim"] == "lamb"
    assert out["optimizer_class"] == "hf_clinic.optim.lamb.Lamb"
    assert out["global_step"] == 2 and len(out["losses"]) == 2
    # The Trainer's default weight_decay=0.0 turns "decayed" LAMB into Adam: a stock run shows the warning.
    assert "LambDegeneratesToAdamWarning" in result.stderr and "degenerates to Adam" in result.stderr


def test_launcher_runs_a_module(tmp_path, monkeypatch):
    # In process (the names are registered already): checks the -m plumbing (sys.argv, sys.path, __main__).
    monkeypatch.chdir(SCRIPTS)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    launch.main(["-m", "integ_stock_train", *script_args(tmp_path, "radam_sgd")])
    with open(tmp_path / "res" / "rank0.json") as f:
        out = json.load(f)
    assert out["optim"] == "radam_sgd" and out["optimizer_class"] == "hf_clinic.optim.radam.RAdam"
    assert OptimizerNames("radam_sgd").value == "radam_sgd"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([], 2, "usage:"),
        (["--help"], 0, "usage:"),
        (["missing.py"], 2, "no such script: 'missing.py'"),
        (["-m"], 2, "-m needs a module name"),
    ],
)
def test_launcher_usage(argv, code, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert message in err
    if message == "usage:":
        assert "lamb_nvlamb" in err
