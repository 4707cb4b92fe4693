"""Admin under real 2-process DDP (gloo): identical ω on both ranks, from statistics pooled over both ranks' batches.

One `accelerate launch` runs `tests/scripts/admin_ddp.py`, which checks the functional API and AdminCallback.
The functional reference is a single-process profile over both ranks' batches, computed in the script before the
process group exists.
"""

import json
import os

import pytest
from launch_utils import accelerate_launch


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("admin_ddp")
    accelerate_launch([os.path.join(HERE, "scripts", "admin_ddp.py"), str(out)], timeout=600)
    with open(out / "results.json") as f:
        return json.load(f)


def test_functional_profile_is_pooled_over_ranks(results):
    r0, r1 = results["ranks"]
    assert r0["world_size"] == 2 and r0["functional_num_processes"] == 2
    # The ranks profiled different batches (so agreement is not trivial), and report the pooled statistics ...
    assert r0["functional_batch"] != r1["functional_batch"]
    assert r0["local_var_x0"] == r1["local_var_x0"]
    assert r0["functional_omegas"] == r1["functional_omegas"]
    # ... and the pooled result equals one process profiling both batches.
    assert r0["functional_omegas"] == pytest.approx(results["reference"], rel=1e-6)
    assert max(r0["functional_omegas"]) > 1.0


def test_plain_accelerate_ddp_loop_trains_identical_omega(results):
    r0, r1 = results["ranks"]
    assert r0["loop_omega"] == r1["loop_omega"]
    # ω starts as a scalar fill; after two DDP steps every vector has been trained per dimension.
    assert len(r0["loop_omega"]) == 8 and all(len(set(vector)) > 1 for vector in r0["loop_omega"])


def test_trainer_callback_sets_identical_omega_on_both_ranks(results):
    r0, r1 = results["ranks"]
    assert r0["trainer_first_batch"] != r1["trainer_first_batch"]  # each rank profiled its own shard
    assert r0["trainer_report_num_processes"] == 2
    assert r0["trainer_profiled"] == r1["trainer_profiled"]
    assert any(v != 1.0 for vec in r0["trainer_profiled"] for v in vec)
    assert r0["final_omega"] == r1["final_omega"] and r0["final_params"] == r1["final_params"]
