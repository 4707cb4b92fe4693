"""Launched by `tests/test_local_clipping.py` with 2 CPU processes (gloo): CELGC and clip schedules under DDP.

Every check compares against something computed here, independently of hf_clinic:

* a float64 simulation of the CELGC algorithm for both workers (paper rule: x <- x - min(eta, gamma/||g||) g, average
  every I steps), which every rank runs on the data of both ranks;
* the number of `torch.distributed.all_reduce` calls, counted by this script's own wrapper around that function;
* the replicas themselves, gathered from both ranks.

Rank 0 writes the results as JSON to `argv[1]/results.json`; the test asserts on them.
"""

import copy
import json
import math
import os
import sys

import torch
import torch.distributed as dist


# Count every all-reduce issued while COUNTING["on"]; installed before hf_clinic or accelerate use the function.
COUNTING = {"on": False, "calls": 0}
_all_reduce = dist.all_reduce


def _counting_all_reduce(*args, **kwargs):
    if COUNTING["on"]:
        COUNTING["calls"] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = _counting_all_reduce

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from accelerate import Accelerator  # noqa: E402
from tiny_models import classification_batch, tiny_bert  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_clinic import ClipAwareCallback, LocalClippingCallback, LocalGradientClipping  # noqa: E402


OUT = sys.argv[1]
ETA0, GAMMA, STEPS = 0.2, 0.25, 12


def lr_factor(t):
    return 1.0 / (1.0 + 0.1 * t)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 8, generator=g) * (1 + rank)  # different data scale per worker: different local norms
    y = torch.randn(8, 1, generator=g)
    return x.to(dtype), y.to(dtype)


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def flat_buffers(model):
    return torch.cat([b.detach().reshape(-1).double() for b in model.buffers() if torch.is_floating_point(b)])


def reference(local_steps):
    """CELGC in float64 for both workers, from the paper's pseudo-code."""
    base = make_model().double()
    workers = [copy.deepcopy(base) for _ in range(2)]
    params, buffers, norms = [], [], []
    for t in range(STEPS):
        eta = ETA0 * lr_factor(t)
        step_norms = []
        for r, w in enumerate(workers):
            x, y = batch(r, t, torch.float64)
            w.zero_grad()
            torch.nn.functional.mse_loss(w(x), y).backward()
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in w.parameters()))
            h = min(eta, GAMMA / norm)
            with torch.no_grad():
                for p in w.parameters():
                    p -= h * p.grad
            step_norms.append(norm)
        if (t + 1) % local_steps == 0:
            with torch.no_grad():
                for tensors in zip(*(list(w.parameters()) + list(w.buffers()) for w in workers), strict=True):
                    if torch.is_floating_point(tensors[0]):
                        mean = sum(tensors) / len(tensors)
                        for tensor in tensors:
                            tensor.copy_(mean)
        params.append([flat(w) for w in workers])
        buffers.append([flat_buffers(w) for w in workers])
        norms.append(step_norms)
    return params, buffers, norms


def run_plain(accelerator, local_steps):
    """The user's loop: Accelerate + LocalGradientClipping; returns per-step params, buffers and local norms."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    params, buffers, norms = [], [], []
    COUNTING.update(on=True, calls=0)
    with LocalGradientClipping(accelerator, model, optimizer, gamma=GAMMA, local_steps=local_steps) as celgc:
        for t in range(STEPS):
            x, y = batch(rank, t)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            norms.append(celgc.schedule.last.grad_norm)
            optimizer.zero_grad()
            celgc.step()
            params.append(flat(model))
            buffers.append(flat_buffers(model))
    COUNTING["on"] = False
    n_float = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if torch.is_floating_point(b)
    )
    return {
        "params": params,
        "buffers": buffers,
        "norms": norms,
        "all_reduce_calls": COUNTING["calls"],
        "rounds": celgc.num_rounds,
        "metrics": celgc.metrics(),
        "expected_bytes_per_round": (n_float + 2) * 4,
        "clipped_steps": celgc.schedule.num_clipped,
    }


def check_accumulation_and_buckets(accelerator, results):
    """Averaging counts optimizer steps, not micro-batches; bucketed averaging issues one all-reduce per bucket."""
    from hf_clinic.distributed import ReplicaAverager

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=ETA0)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    accelerator.gradient_accumulation_steps = 2
    COUNTING.update(on=True, calls=0)
    with LocalGradientClipping(accelerator, model, optimizer, gamma=GAMMA, local_steps=2) as celgc:
        for t in range(8):  # 8 micro-batches = 4 optimizer steps = 2 rounds
            with accelerator.accumulate(model):
                x, y = batch(rank, t)
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                celgc.step()
    COUNTING["on"] = False
    accelerator.gradient_accumulation_steps = 1
    accumulation_calls = COUNTING["calls"]

    # Two Linear(4, 4) layers (64 + 16 bytes each) under a 100-byte cap: two buckets, each averaged exactly.
    probe = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        for i, p in enumerate(probe.parameters()):
            p.fill_(float(rank * 10 + i))
    averager = ReplicaAverager(probe, bucket_cap_mb=100 / 2**20)
    COUNTING.update(on=True, calls=0)
    averager.average_()
    COUNTING["on"] = False
    expected = [float(i) + 5.0 for i in range(4)]  # mean of rank 0 (i) and rank 1 (10 + i)
    values = [p.detach().unique().tolist() for p in probe.parameters()]
    if rank == 0:
        results["accumulation"] = {"all_reduce_calls": accumulation_calls, "rounds": celgc.num_rounds}
        results["buckets"] = {
            "all_reduce_calls": COUNTING["calls"],
            "collectives": averager.num_collectives,
            "values": values,
            "expected": [[v] for v in expected],
        }


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_plain(accelerator, local_steps, results):
    run = run_plain(accelerator, local_steps)
    ref_params, ref_buffers, ref_norms = reference(local_steps)
    rank = accelerator.process_index
    err = max(float((p - ref[rank]).abs().max()) for p, ref in zip(run["params"], ref_params, strict=True))
    buf_err = max(float((b - ref[rank]).abs().max()) for b, ref in zip(run["buffers"], ref_buffers, strict=True))
    norm_err = max(abs(n - ref[rank]) / ref[rank] for n, ref in zip(run["norms"], ref_norms, strict=True))
    all_params = gather([p.tolist() for p in run["params"]])
    all_buffers = gather([b.tolist() for b in run["buffers"]])
    same = [all_params[0][t] == all_params[1][t] for t in range(STEPS)]
    same_buffers = [all_buffers[0][t] == all_buffers[1][t] for t in range(STEPS)]
    ref_clipped = sum(ETA0 * lr_factor(t) * ref_norms[t][r] > GAMMA for t in range(STEPS) for r in range(2))
    errors = gather([err, buf_err, norm_err])
    if rank == 0:
        results[f"I{local_steps}"] = {
            "max_param_err": max(e[0] for e in errors),
            "max_buffer_err": max(e[1] for e in errors),
            "max_rel_norm_err": max(e[2] for e in errors),
            "replicas_identical_after_step": same,
            "buffers_identical_after_step": same_buffers,
            "ref_norms_differ_across_workers": all(abs(a - b) > 1e-3 * a for a, b in ref_norms),
            "all_reduce_calls": run["all_reduce_calls"],
            "rounds": run["rounds"],
            "metrics": run["metrics"],
            "expected_bytes_per_round": run["expected_bytes_per_round"],
            "ref_clipped_worker_steps": ref_clipped,
            "clip_rate_expected": ref_clipped / (2 * STEPS),
        }


class Recorder(TrainerCallback):
    """Per step: the classifier weights and this rank's local pre-clip norm (as seen by the clip schedule)."""

    def __init__(self, clip_callback):
        self.clip_callback = clip_callback
        self.params, self.norms = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Runs after LocalClippingCallback.on_step_end (added later), i.e. after any averaging of this step.
        self.params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist())
        self.norms.append(self.clip_callback.schedule.last.grad_norm)


def check_trainer(results):
    rank = int(os.environ.get("RANK", 0))
    g = torch.Generator().manual_seed(7)
    data = classification_batch(64, generator=g)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(64)]
    args = TrainingArguments(
        os.path.join(OUT, "trainer"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        optim="sgd",
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    local = LocalClippingCallback(gamma=0.05, local_steps=2)
    recorder = Recorder(local)
    trainer = Trainer(tiny_bert(), args, train_dataset=dataset, callbacks=[local, recorder])
    COUNTING.update(on=True, calls=0)
    trainer.train()
    COUNTING["on"] = False
    calls = COUNTING["calls"]
    all_params = gather(recorder.params)
    all_norms = gather(recorder.norms)
    final = gather(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).tolist())
    if rank == 0:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(OUT, "trainer", "checkpoint-3", "model.safetensors"))
        names = [n for n, _ in trainer.model.named_parameters()]
        step3 = torch.tensor(all_params[1][2])
        sizes = [p.numel() for p in trainer.model.parameters()]
        rank1_step3 = dict(zip(names, step3.split(sizes), strict=True))
        checkpoint_err = max(float((saved[n].reshape(-1) - rank1_step3[n]).abs().max()) for n in names if n in saved)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        results["trainer"] = {
            "identical_after_step": [all_params[0][t] == all_params[1][t] for t in range(6)],
            "local_norms_differ": [abs(a - b) > 1e-6 for a, b in zip(all_norms[0], all_norms[1], strict=True)],
            "final_identical": final[0] == final[1],
            "checkpoint3_matches_rank1_step3": checkpoint_err,
            "logged_rounds": [h.get("local/rounds") for h in logs],
            "logged_clip_rate": [h.get("local/clip_rate") for h in logs],
            "clip_keys": sorted(k for k in logs[-1] if k.startswith(("clip/", "local/"))),
            "all_reduce_calls": calls,
        }


def check_clip_callback(results):
    """ClipAwareCallback under DDP: the all-reduced gradients give both ranks the same decisions and parameters."""
    rank = int(os.environ.get("RANK", 0))
    g = torch.Generator().manual_seed(3)
    data = classification_batch(32, generator=g)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(32)]
    args = TrainingArguments(
        os.path.join(OUT, "clip"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    callback = ClipAwareCallback("percentile", percentile=50.0)
    trainer = Trainer(tiny_bert(), args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    states = gather(callback.schedule.state_dict())
    final = gather(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).tolist())
    if rank == 0:
        results["clip_callback"] = {
            "same_state": states[0] == states[1],
            "history_len": len(states[0]["policy_state"]["history"]),
            "final_identical": final[0] == final[1],
        }


def main():
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    results = {"distributed_type": accelerator.distributed_type.name}
    check_plain(accelerator, 1, results)
    check_plain(accelerator, 4, results)
    check_accumulation_and_buckets(accelerator, results)
    check_trainer(results)
    check_clip_callback(results)
    if accelerator.is_main_process:
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
