"""Every multi-process check of issue 3 in one launch (each `accelerate launch` costs ~10 s of start-up).

Started by `tests/test_accelerate_multiprocess.py` as

    accelerate launch --multi_gpu --num_processes 2 -m hf_clinic.launch tests/scripts/integ_ddp.py \\
        --output_dir OUT --result_dir RES --optim lamb --weight_decay 0.01 --use_cpu true ...

1. Trainer + DDP, the stock way: this part uses transformers only (`HfArgumentParser` accepts `--optim lamb` because
   the launcher imported hf_clinic); a second run switches to `lars`. After every optimizer step the parameters and
   the trust-ratio telemetry are gathered from both ranks and compared bit for bit.
2. A plain Accelerate loop: `hf_clinic.create_optimizer(model, "lamb")` under `accelerator.prepare`, gradient
   accumulation over 2 micro-batches and `accelerator.clip_grad_norm_`; cross-rank equality after every step, and
   agreement with a single-process reference that trains an unwrapped copy on all four micro-batches of the step.
3. FSDP2 (`fully_shard` on CPU/gloo): LAMB and LARS on DTensor parameters against the same unsharded reference, with
   the optimizer built by the Trainer's handler; and FSDP1 (`FullyShardedDataParallel`), which the handler refuses.

Each rank writes `RES/rank{N}.json`; the pytest side asserts on them.
"""

import copy
import json
import os
import sys
from dataclasses import dataclass, field, replace


HF_CLINIC_IMPORTED_BEFORE_SCRIPT = "hf_clinic" in sys.modules

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


@dataclass
class ScriptArguments:
    result_dir: str = field(metadata={"help": "Folder for one result JSON per process."})


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def batch(seed, size=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (size, 12), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (size,), generator=g),
    }


def gathered(values: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values.contiguous())
    return out


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def inner(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def telemetry_vector(optimizer) -> tuple[list[str], torch.Tensor]:
    values = inner(optimizer).telemetry()
    keys = sorted(values)
    return keys, torch.tensor([values[k] for k in keys], dtype=torch.float64)


def ranks_identical(vector: torch.Tensor) -> bool:
    return all(torch.equal(v, vector) for v in gathered(vector))


class CrossRankCheck(TrainerCallback):
    """After each optimizer step: parameters and telemetry identical on every rank (bitwise)."""

    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        keys, telemetry = telemetry_vector(optimizer)
        self.steps.append(
            {
                "params_identical": ranks_identical(flat(model.parameters())),
                "telemetry_identical": ranks_identical(telemetry),
                "telemetry_keys": keys,
            }
        )


# ------------------------------------------------------------------------------------------------ 1. Trainer + DDP


def trainer_runs(training_args):
    dataset = [{k: v[i] for k, v in batch(seed=1, size=32).items()} for i in range(32)]
    runs = {}
    for args in (training_args, replace(training_args, optim="lars", learning_rate=1.0)):
        check = CrossRankCheck()
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset, callbacks=[check])
        trainer.train()
        runs[args.optim.value] = {
            "optimizer_class": type(inner(trainer.optimizer)).__name__,
            "parallel_mode": str(trainer.args.parallel_mode),
            "distributed_type": trainer.accelerator.distributed_type.value,
            "wrapped_model": type(trainer.model_wrapped).__name__,
            "steps": check.steps,
            "logged_telemetry": [
                {k: v for k, v in log.items() if "/" in k} for log in trainer.state.log_history if "loss" in log
            ],
        }
    return runs


# ------------------------------------------------------------------------------------------------ 2. Accelerate loop


def reference_step(reference, optimizer, batches, max_norm):
    """One step of an unwrapped model on all micro-batches of all ranks (mean loss), clipped, in one process."""
    loss = sum(reference(**b).loss for b in batches) / len(batches)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad()
    return norm


def accelerate_loop(steps=3, micro=2, max_norm=0.05):
    from accelerate import Accelerator

    import hf_clinic

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = tiny_bert()
    reference = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    optimizer = hf_clinic.create_optimizer(model, "lamb", **kwargs)
    reference_optimizer = hf_clinic.create_optimizer(reference, "lamb", **kwargs)
    model, optimizer = accelerator.prepare(model, optimizer)

    records = []
    for step in range(steps):
        norm = None
        for k in range(micro):
            with accelerator.accumulate(model):
                loss = model(**batch(seed=1000 * step + 10 * k + rank)).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                optimizer.zero_grad()
        all_batches = [batch(seed=1000 * step + 10 * k + r) for k in range(micro) for r in range(world)]
        reference_norm = reference_step(reference, reference_optimizer, all_batches, max_norm)
        keys, telemetry = telemetry_vector(optimizer)
        _, reference_telemetry = telemetry_vector(reference_optimizer)
        ours = flat(accelerator.unwrap_model(model).parameters())
        records.append(
            {
                "synced_after_micro_batches": micro,
                "params_identical": ranks_identical(ours),
                "telemetry_identical": ranks_identical(telemetry),
                "grad_norm": float(norm),
                "reference_grad_norm": float(reference_norm),
                "max_param_diff_vs_reference": (ours - flat(reference.parameters())).abs().max().item(),
                "telemetry": dict(zip(keys, telemetry.tolist(), strict=True)),
                "reference_telemetry": dict(zip(keys, reference_telemetry.tolist(), strict=True)),
            }
        )
    initial = flat(tiny_bert().parameters())
    return {
        "optimizer_class": type(inner(optimizer)).__name__,
        "distributed_type": accelerator.distributed_type.value,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "max_param_change": (flat(accelerator.unwrap_model(model).parameters()) - initial).abs().max().item(),
        "steps": records,
    }


# ------------------------------------------------------------------------------------------------ 3. FSDP2 / FSDP1


def fsdp2_run(training_args, optim, optim_args=None, steps=3, shard_root=True):
    """`shard_root=False` shards the encoder layers only: DTensors and plain tensors in one model (mixed meshes)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_bert()
    reference = copy.deepcopy(model)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    if shard_root:
        fully_shard(model)
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    args = replace(training_args, optim=optim, optim_args=optim_args, learning_rate=1e-2, weight_decay=0.01)
    # The Trainer's own path: handler -> (class, kwargs with param groups), then class(groups, **kwargs).
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    optimizer = cls(kwargs.pop("params"), **kwargs)
    reference_cls, reference_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, reference)
    reference_kwargs = dict(reference_kwargs)
    reference_optimizer = reference_cls(reference_kwargs.pop("params"), **reference_kwargs)
    sharded = all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    # Each group must hold one kind only: foreach kernels cannot mix DTensors and plain tensors.
    groups_single_kind = all(len({isinstance(p, DTensor) for p in g["params"]}) == 1 for g in optimizer.param_groups)

    records = []
    try:
        for step in range(steps):
            full = batch(seed=500 + step, size=8)
            local = {k: v.chunk(world)[rank] for k, v in full.items()}
            model(**local).loss.backward()
            for p in plain:  # what DDP would do for the unsharded part
                dist.all_reduce(p.grad)
                p.grad /= world
            optimizer.step()
            optimizer.zero_grad()
            reference(**full).loss.backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad()
            full_params = flat(p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters())
            keys, telemetry = telemetry_vector(optimizer)
            _, reference_telemetry = telemetry_vector(reference_optimizer)
            records.append(
                {
                    "max_param_diff_vs_reference": (full_params - flat(reference.parameters())).abs().max().item(),
                    "telemetry": dict(zip(keys, telemetry.tolist(), strict=True)),
                    "reference_telemetry": dict(zip(keys, reference_telemetry.tolist(), strict=True)),
                }
            )
    except Exception as err:  # recorded: the pytest side decides what is acceptable
        return {
            "sharded": sharded,
            "single_kind": groups_single_kind,
            "error": f"{type(err).__name__}: {err}",
            "steps": records,
        }
    return {"sharded": sharded, "single_kind": groups_single_kind, "error": None, "steps": records}


def fsdp1_refusal(training_args):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(tiny_bert(), device_id=torch.device("cpu"), use_orig_params=True)
    refusals = {}
    for optim in ("lamb", "radam"):
        try:
            Trainer.get_optimizer_cls_and_kwargs(replace(training_args, optim=optim), model)
            refusals[optim] = None
        except NotImplementedError as err:
            refusals[optim] = str(err)
    return refusals


def main():
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    result = {
        "hf_clinic_imported_before_script": HF_CLINIC_IMPORTED_BEFORE_SCRIPT,
        "cli_optim": training_args.optim.value,
        "world_size": training_args.world_size,
        "trainer": trainer_runs(training_args),
        "accelerate": accelerate_loop(),
        "fsdp2": {
            "lamb": fsdp2_run(training_args, "lamb"),
            "lamb_forloop": fsdp2_run(training_args, "lamb", "foreach=false"),
            "lars_forloop": fsdp2_run(training_args, "lars", "foreach=false"),
            "lars_foreach": fsdp2_run(training_args, "lars", "foreach=true"),
            # telemetry off: its min/median/max summary cannot yet concatenate DTensor and plain ratios
            "lamb_partially_sharded": fsdp2_run(training_args, "lamb", "telemetry=false", shard_root=False),
        },
        "fsdp1_refusals": fsdp1_refusal(training_args),
    }
    os.makedirs(script_args.result_dir, exist_ok=True)
    with open(os.path.join(script_args.result_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
