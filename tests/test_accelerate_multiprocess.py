"""Issue 3, multi-process: one real `accelerate launch` of 2 CPU processes (gloo) through `-m hf_clinic.launch`.

`tests/scripts/integ_ddp.py` runs the Trainer with DDP (`--optim lamb` parsed by a stock `HfArgumentParser`, then
`lars`), a plain Accelerate loop with `hf_clinic.create_optimizer`, and FSDP2/FSDP1 checks; each rank writes its
results. References: the other rank (bitwise), and an unwrapped single-process copy trained on the same data.
"""

import json
import os

import pytest
from launch_utils import REPO_ROOT, accelerate_launch


SCRIPT = os.path.join(REPO_ROOT, "tests", "scripts", "integ_ddp.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    accelerate_launch(
        [
            "-m",
            "hf_clinic.launch",
            SCRIPT,
            "--output_dir",
            str(out / "trainer"),
            "--result_dir",
            str(out / "results"),
            "--optim",
            "lamb",
            "--weight_decay",
            "0.01",
            "--learning_rate",
            "1e-2",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
        ],
        timeout=420,
    )
    ranks = []
    for rank in range(2):
        with open(out / "results" / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return ranks


def test_launcher_registered_the_names_on_every_rank(results):
    for rank in results:
        assert rank["hf_clinic_imported_before_script"] is True
        assert rank["cli_optim"] == "lamb"
        assert rank["world_size"] == 2


@pytest.mark.parametrize(("optim", "cls", "prefix"), [("lamb", "Lamb", "lamb/"), ("lars", "Lars", "lars/")])
def test_trainer_ddp_keeps_ranks_identical(results, optim, cls, prefix):
    for rank in results:
        run = rank["trainer"][optim]
        assert run["optimizer_class"] == cls
        assert run["distributed_type"] == "MULTI_CPU"
        assert run["wrapped_model"] == "DistributedDataParallel"
        assert len(run["steps"]) == 3
        for step in run["steps"]:
            assert step["params_identical"] and step["telemetry_identical"]
            assert step["telemetry_keys"] == [f"{prefix}trust_ratio_{k}" for k in ("max", "median", "min")]
        assert all(set(log) == set(run["steps"][0]["telemetry_keys"]) for log in run["logged_telemetry"])
    # Rank 0 logs; both ranks see the same values.
    assert results[0]["trainer"][optim]["logged_telemetry"] == results[1]["trainer"][optim]["logged_telemetry"]


def test_accelerate_loop_matches_a_single_process_reference(results):
    for rank in results:
        run = rank["accelerate"]
        assert run["optimizer_class"] == "Lamb"
        assert run["distributed_type"] == "MULTI_CPU"
        assert run["gradient_accumulation_steps"] == 2
        assert run["max_param_change"] > 1e-2  # the comparison below is meaningful
        for step in run["steps"]:
            assert step["params_identical"] and step["telemetry_identical"]
            assert step["grad_norm"] == pytest.approx(step["reference_grad_norm"], rel=1e-5)
            assert step["grad_norm"] > 0.05  # clipping was active (max_norm=0.05)
            # Equal up to float summation order (the all-reduce adds the ranks' gradients in another order).
            assert step["max_param_diff_vs_reference"] < 1e-6
            assert step["telemetry"] == pytest.approx(step["reference_telemetry"], rel=1e-5)


@pytest.mark.parametrize("run", ["lamb", "lamb_forloop", "lars_forloop", "lamb_partially_sharded"])
def test_fsdp2_trust_ratios_are_computed_on_full_parameters(results, run):
    for rank in results:
        outcome = rank["fsdp2"][run]
        # A partially sharded model mixes DTensors and plain tensors; the handler puts them in separate groups.
        assert outcome["sharded"] is (run != "lamb_partially_sharded")
        assert outcome["single_kind"] is True
        assert outcome["error"] is None
        assert len(outcome["steps"]) == 3
        for step in outcome["steps"]:
            assert step["max_param_diff_vs_reference"] < 1e-6
            assert step["telemetry"] == pytest.approx(step["reference_telemetry"], rel=1e-5)
            assert bool(step["telemetry"]) is (run != "lamb_partially_sharded")  # switched off there


def test_fsdp2_lars_foreach(results):
    test_fsdp2_trust_ratios_are_computed_on_full_parameters(results, "lars_foreach")


def test_fsdp1_is_refused_by_the_trainer_handler(results):
    for rank in results:
        for optim, message in rank["fsdp1_refusals"].items():
            assert message is not None, optim
            assert "not supported under FSDP1" in message and "FSDP2" in message
