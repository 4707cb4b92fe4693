"""Optimizer-step benchmark (issue 2): hf-clinic vs peers on the parameter shapes of BERT-base.

Times `optimizer.step()` alone on the 199 parameter tensors of BERT-base (≈110M parameters, fp32, CPU), with fixed
random gradients. Every implementation runs in the same process against the same parameters, interleaved step by
step with the anchor `torch.optim.AdamW(fused=True)`, so the reported ratios compare steps taken under the same
machine load. Each implementation gets `--warmup` untimed steps (≥ 10, so RAdam is past its warm phase and
compiled kernels are built) and `--steps` timed ones; the median is reported.

Memory: the optimizer state is measured as the bytes of its state tensors (the `step` counters excluded) and compared
with the theoretical size (buffers per parameter × parameter bytes); the transient extra memory is the peak of
allocations minus frees during one step, from the torch profiler's memory events.

Peers: torch AdamW (fused, the floor anchor), torch RAdam (foreach and for-loop), pytorch_optimizer RAdam/Lamb/LARS,
timm Lamb/Lars when installed (`pip install --no-deps timm`; loaded by file path, `timm` itself is never imported
because it needs torchvision).

Usage:
    python benchmarks/optimizers.py [--json PATH] [--threads 2] [--warmup 10] [--steps 7] [--only lamb,lars]
                                    [--clock wall|cpu] [--no-memory]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


ALGORITHMS = ("adamw", "radam", "lamb", "lars", "gsignsgd")
# Targets from issue 2: our median / fused AdamW median.
TARGETS = {"radam": 1.2, "lamb": 1.5, "lars": 1.0}
PEER_SPEEDUP_TARGET = 1.5


def bert_base_shapes() -> list[tuple[int, ...]]:
    """The 199 parameter shapes of `BertModel` (bert-base-uncased: 12 layers, hidden 768, vocab 30522)."""
    hidden, intermediate, vocab = 768, 3072, 30522
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    per_layer = [
        (hidden, hidden), (hidden,),  # query
        (hidden, hidden), (hidden,),  # key
        (hidden, hidden), (hidden,),  # value
        (hidden, hidden), (hidden,),  # attention output dense
        (hidden,), (hidden,),  # attention output LayerNorm
        (intermediate, hidden), (intermediate,),  # intermediate dense
        (hidden, intermediate), (hidden,),  # output dense
        (hidden,), (hidden,),  # output LayerNorm
    ]  # fmt: skip
    shapes += per_layer * 12
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in bert_base_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        p.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(p)
    return params


# ------------------------------------------------------------------------------------------------ peers


def _load_timm_optim() -> types.ModuleType | None:
    """timm's optim modules by file path, without importing timm (whose __init__ needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    optim_dir = Path(next(iter(spec.submodule_search_locations))) / "optim"
    package = types.ModuleType("_timm_optim")
    package.__path__ = [str(optim_dir)]
    sys.modules["_timm_optim"] = package
    try:
        for name in ("_types", "_helpers", "lamb", "lars"):
            module_spec = importlib.util.spec_from_file_location(f"_timm_optim.{name}", optim_dir / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
    except Exception as err:  # pragma: no cover - depends on the installed timm
        print(f"# timm optimizers not loadable without torchvision: {err}", file=sys.stderr)
        return None
    return package


@dataclass(frozen=True)
class Impl:
    impl: str
    algorithm: str
    factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    buffers: int  # state tensors per parameter, theoretically
    ours: bool = False


def implementations() -> list[Impl]:
    import hf_clinic

    impls = [
        Impl("torch.AdamW(fused)", "adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True), 2),
        Impl(
            "torch.RAdam(foreach)",
            "radam",
            lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True, foreach=True),
            2,
        ),
        Impl(
            "torch.RAdam(for-loop)",
            "radam",
            lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True, foreach=False),
            2,
        ),
    ]
    try:
        import pytorch_optimizer as po

        impls += [
            Impl("pytorch_optimizer.RAdam", "radam", lambda p: po.RAdam(p, lr=1e-3, weight_decay=0.01), 2),
            Impl(
                "pytorch_optimizer.RAdam(foreach)",
                "radam",
                lambda p: po.RAdam(p, lr=1e-3, weight_decay=0.01, foreach=True),
                2,
            ),
            Impl("pytorch_optimizer.Lamb", "lamb", lambda p: po.Lamb(p, lr=1e-3, weight_decay=0.01), 2),
            Impl(
                "pytorch_optimizer.Lamb(foreach)",
                "lamb",
                lambda p: po.Lamb(p, lr=1e-3, weight_decay=0.01, foreach=True),
                2,
            ),
            Impl("pytorch_optimizer.LARS", "lars", lambda p: po.LARS(p, lr=1.0, weight_decay=1e-4, momentum=0.9), 1),
            Impl(
                "pytorch_optimizer.LARS(foreach)",
                "lars",
                lambda p: po.LARS(p, lr=1.0, weight_decay=1e-4, momentum=0.9, foreach=True),
                1,
            ),
        ]
    except ImportError:
        print("# pytorch_optimizer not installed: its peers are skipped", file=sys.stderr)
    timm_optim = _load_timm_optim()
    if timm_optim is not None:
        timm_lamb, timm_lars = timm_optim.lamb.Lamb, timm_optim.lars.Lars
        impls += [
            Impl("timm.Lamb", "lamb", lambda p: timm_lamb(p, lr=1e-3, weight_decay=0.01, max_grad_norm=None), 2),
            Impl(
                "timm.Lamb(foreach)",
                "lamb",
                lambda p: timm_lamb(p, lr=1e-3, weight_decay=0.01, max_grad_norm=None, foreach=True),
                2,
            ),
            Impl("timm.Lars", "lars", lambda p: timm_lars(p, lr=1.0, momentum=0.9, weight_decay=1e-4), 1),
            Impl(
                "timm.Lars(foreach)",
                "lars",
                lambda p: timm_lars(p, lr=1.0, momentum=0.9, weight_decay=1e-4, foreach=True),
                1,
            ),
        ]
    impls += [
        Impl(
            "hf_clinic.RAdam(foreach)", "radam", lambda p: hf_clinic.RAdam(p, weight_decay=0.01, foreach=True), 2, True
        ),
        Impl("hf_clinic.RAdam(fused)", "radam", lambda p: hf_clinic.RAdam(p, weight_decay=0.01, fused=True), 2, True),
        Impl("hf_clinic.Lamb(foreach)", "lamb", lambda p: hf_clinic.Lamb(p, weight_decay=0.01, foreach=True), 2, True),
        Impl("hf_clinic.Lamb(fused)", "lamb", lambda p: hf_clinic.Lamb(p, weight_decay=0.01, fused=True), 2, True),
        Impl(
            "hf_clinic.Lars(foreach)",
            "lars",
            lambda p: hf_clinic.Lars(p, lr=1.0, weight_decay=1e-4, foreach=True),
            1,
            True,
        ),
        Impl(
            "hf_clinic.Lars(fused)",
            "lars",
            lambda p: hf_clinic.Lars(p, lr=1.0, weight_decay=1e-4, fused=True),
            1,
            True,
        ),
        Impl(
            "hf_clinic.GeneralizedSignSGD(foreach)",
            "gsignsgd",
            lambda p: hf_clinic.GeneralizedSignSGD(p, foreach=True),
            2,
            True,
        ),
        Impl(
            "hf_clinic.GeneralizedSignSGD(fused)",
            "gsignsgd",
            lambda p: hf_clinic.GeneralizedSignSGD(p, fused=True),
            2,
            True,
        ),
    ]
    return impls


# ------------------------------------------------------------------------------------------------ measurement


def _timed_step(optimizer: torch.optim.Optimizer, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    optimizer.step()
    return (clock() - start) * 1e3


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and k != "step" and v.dim() > 0
    )


def peak_step_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Peak of (allocations − frees) during one step, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    params = make_params()
    n_params = sum(p.numel() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    impls = implementations()
    if args.only:
        wanted = set(args.only.split(","))
        impls = [i for i in impls if i.algorithm in wanted or i.algorithm == "adamw"]

    original_grads = [p.grad.clone() for p in params]
    anchor_impl = impls[0]
    anchor = anchor_impl.factory(params)
    for _ in range(args.warmup):
        anchor.step()

    records = []
    for impl in impls:
        # some peers (pytorch_optimizer LARS) write into p.grad: every implementation starts from the same grads
        for p, g in zip(params, original_grads, strict=True):
            p.grad.copy_(g)
        optimizer = anchor if impl is anchor_impl else impl.factory(params)
        start = time.perf_counter()
        optimizer.step()
        first_step_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            optimizer.step()
        times, anchor_times = [], []
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for _ in range(args.steps):
            anchor_times.append(_timed_step(anchor, clock))
            times.append(_timed_step(optimizer, clock))
        state = state_bytes(optimizer)
        peak = peak_step_bytes(optimizer) if not args.no_memory else None
        record = {
            "impl": impl.impl,
            "algorithm": impl.algorithm,
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "max_ms": max(times),
            "params": n_params,
            "clock": args.clock,
            "anchor_median_ms": statistics.median(anchor_times),
            "first_step_s": first_step_s,
            "state_bytes": state,
            "theoretical_state_bytes": impl.buffers * param_bytes,
            "peak_extra_bytes": peak,
            "largest_param_bytes": largest,
            "ours": impl.ours,
        }
        record["ratio_to_fused_adamw"] = record["median_ms"] / record["anchor_median_ms"]
        records.append(record)
        print(
            f"{impl.impl:40s} {record['median_ms']:9.1f} ms  (x{record['ratio_to_fused_adamw']:.2f} fused AdamW)  "
            f"state {state / 2**20:7.1f} MiB / {record['theoretical_state_bytes'] / 2**20:7.1f}  "
            f"peak extra {'-' if peak is None else f'{peak / 2**20:7.1f} MiB'}  first step {first_step_s:.1f} s",
            flush=True,
        )
        if optimizer is not anchor:
            del optimizer
            gc.collect()
    return {
        "benchmark": "optimizer step, BERT-base parameter shapes",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
            "python": platform.python_version(),
        },
        "records": records,
        "summary": summarize(records),
    }


def summarize(records: list[dict]) -> list[dict]:
    """Per algorithm: our fused implementation vs the anchor and vs the fastest peer."""
    rows = []
    for algorithm in ALGORITHMS[1:]:
        ours = [r for r in records if r["algorithm"] == algorithm and r["ours"] and "(fused)" in r["impl"]]
        peers = [r for r in records if r["algorithm"] == algorithm and not r["ours"]]
        if not ours:
            continue
        mine = ours[0]
        row = {"algorithm": algorithm, "impl": mine["impl"], "ratio_to_fused_adamw": mine["ratio_to_fused_adamw"]}
        if algorithm in TARGETS:
            row["target_ratio"] = TARGETS[algorithm]
            row["meets_ratio_target"] = mine["ratio_to_fused_adamw"] <= TARGETS[algorithm]
        if peers:
            fastest = min(peers, key=lambda r: r["ratio_to_fused_adamw"])
            row["fastest_peer"] = fastest["impl"]
            row["speedup_vs_fastest_peer"] = fastest["ratio_to_fused_adamw"] / mine["ratio_to_fused_adamw"]
            row["meets_peer_target"] = row["speedup_vs_fastest_peer"] >= PEER_SPEEDUP_TARGET
        row["state_exact"] = mine["state_bytes"] == mine["theoretical_state_bytes"]
        if mine["peak_extra_bytes"] is not None:
            row["peak_extra_over_largest_param"] = mine["peak_extra_bytes"] / mine["largest_param_bytes"]
            row["meets_memory_target"] = row["peak_extra_over_largest_param"] <= 2.0
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--only", help="comma-separated algorithms to run (the anchor always runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler-based peak-memory step")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter (the reported numbers); cpu: process CPU time of all threads, for tuning "
        "on a machine shared with other jobs (ratios only: it counts both threads)",
    )
    args = parser.parse_args(argv)
    if args.warmup < 10 or args.steps < 5:
        parser.error("issue 2 requires --warmup >= 10 and --steps >= 5")
    result = run(args)
    print("\nsummary:")
    for row in result["summary"]:
        print("  " + json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
