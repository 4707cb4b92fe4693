"""Launched by `tests/test_admin_ddp.py` with 2 CPU processes (gloo): Admin under DDP.

1. Functional (`apply_admin` before `accelerator.prepare`): each rank profiles a *different* batch; the statistics
   are all-reduced, so both ranks must get the same ω, equal to a single-process profile over both ranks' batches
   (computed here before the process group exists, dropout 0 so it is deterministic). Then two DDP steps of a plain
   Accelerate loop: ω is trained and stays identical on both ranks.
2. Trainer + AdminCallback (dropout on, 3 steps): both ranks profile their own first batch and must set the same ω;
   after training every parameter, ω included, must be identical on both ranks.

Rank 0 writes `argv[1]/results.json`; the test asserts on it.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from accelerate import Accelerator  # noqa: E402
from tiny_models import VOCAB, seq2seq_batch, tiny_bert, tiny_marian  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_clinic.admin import AdminCallback, apply_admin  # noqa: E402


NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def build():
    torch.manual_seed(0)
    return tiny_marian(**NO_DROPOUT)


def digest(tensor):
    return hashlib.sha1(tensor.detach().cpu().numpy().tobytes()).hexdigest()


class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.profiled = [p.detach().clone().tolist() for n, p in model.named_parameters() if n.endswith("admin_omega")]


def main(out_dir):
    batches = [
        seq2seq_batch(batch_size=2 + r, src_len=8 + r, generator=torch.Generator().manual_seed(10 + r))
        for r in range(2)
    ]
    assert not dist.is_initialized()
    reference = apply_admin(build(), batches).omegas()

    accelerator = Accelerator()
    rank = accelerator.process_index
    model = build()
    report = apply_admin(model, [batches[rank]])
    local_first_site = report.sites[0].var_residual
    # A plain Accelerate loop: prepare after apply_admin, then two DDP steps on each rank's own batch.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for _ in range(2):
        accelerator.backward(model(**batches[rank]).loss)
        optimizer.step()
        optimizer.zero_grad()
    loop_omega = [p.detach().tolist() for n, p in model.named_parameters() if n.endswith("admin_omega")]

    # --- Trainer + AdminCallback -------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(2, VOCAB, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
        for _ in range(16)
    ]
    torch.manual_seed(0)
    bert = tiny_bert()
    callback, probe = AdminCallback(), Probe()
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=bert, args=args, train_dataset=data, callbacks=[callback, probe])
    seen = []
    bert.register_forward_pre_hook(lambda m, a, kw: seen.append(digest(kw["input_ids"])), with_kwargs=True)
    trainer.train()
    final = torch.cat([p.detach().reshape(-1) for p in bert.parameters()])

    mine = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "functional_omegas": report.omegas(),
        "functional_num_processes": report.num_processes,
        "local_var_x0": local_first_site,
        "functional_batch": digest(batches[rank]["input_ids"]),
        "loop_omega": loop_omega,
        "trainer_profiled": probe.profiled,
        "trainer_report_num_processes": callback.report.num_processes,
        "trainer_first_batch": seen[0],
        "final_params": digest(final),
        "final_omega": [p.detach().tolist() for n, p in bert.named_parameters() if n.endswith("admin_omega")],
    }
    everything = [None] * accelerator.num_processes
    dist.all_gather_object(everything, mine)
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"reference": reference, "ranks": everything}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
