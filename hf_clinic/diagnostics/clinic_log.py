"""The clinic log: one JSON record per line in `<output_dir>/clinic_log.jsonl`, and reading a run directory back.

Record types (every record has `"type"` and `"step"`, the optimizer step it refers to):

* `run_start`: written at `on_train_begin`; `resumed_from` > 0 on resume. A reader drops every earlier record with
  a step after `resumed_from`, so a resumed run reads like an uninterrupted one.
* `log`: a Trainer log (`loss`, `learning_rate`, `grad_norm`, optimizer telemetry, `clip/*`, `admin/*`, ...).
* `diagnostics`: `amplification` and `dependency` (the `to_dict()` of [`Amplification`] and
  [`ResidualDependency`]) and per-site ω, measured before the update of step `step + 1`.
* `update_ratio`: per-layer ‖ΔW‖/‖W‖ of optimizer step `step`.
* `finding`: a [`Finding`].
* `run_end`: written at `on_train_end`.

Values that are not finite are written as JSON `NaN`/`Infinity` (Python's `json` reads them back).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable


__all__ = ["LOG_NAME", "ClinicLogError", "ClinicLogWriter", "RunData", "read_clinic_log", "read_run"]

LOG_NAME = "clinic_log.jsonl"
RECORD_TYPES = ("run_start", "log", "diagnostics", "update_ratio", "finding", "run_end")


class ClinicLogError(ValueError):
    """A run directory or clinic log that cannot be read; the message says which file and line, and why."""


class ClinicLogWriter:
    """Append-only JSONL writer (one process: the Trainer's world process zero)."""

    def __init__(self, path: str, *, fresh: bool):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        # A fresh run starts a new log; a resumed run appends (readers drop the records past the resume step).
        self._file = open(path, "w" if fresh else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def read_clinic_log(path: str) -> list[dict]:
    """All records of a clinic log, resumes resolved. Raises [`ClinicLogError`] for a corrupt line."""
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ClinicLogError(
                    f"Corrupt clinic log {path}, line {number}: {err.msg} (column {err.colno}). The file is written "
                    "one JSON object per line; an interrupted run can leave a truncated last line; delete that line "
                    "and run the report again."
                ) from None
            if not isinstance(record, dict) or record.get("type") not in RECORD_TYPES or "step" not in record:
                raise ClinicLogError(
                    f"Corrupt clinic log {path}, line {number}: expected an object with 'type' in "
                    f"{', '.join(RECORD_TYPES)} and a 'step'; got {line[:80]!r}"
                )
            if record["type"] == "run_start" and record.get("resumed_from"):
                cut = int(record["resumed_from"])
                records = [r for r in records if r["step"] <= cut and r["type"] != "run_end"]
            records.append(record)
    return records


class RunData:
    """Everything `hf-clinic report` needs from a run directory.

    Attributes:
        run_dir (`str`), log_history (`list[dict]`: training/eval logs, by step), records (`list[dict]`: the clinic
        log), trainer_state_path (`str` or `None`), clinic_log_path (`str` or `None`).
    """

    def __init__(self, run_dir, log_history, records, trainer_state_path, clinic_log_path):
        self.run_dir = run_dir
        self.log_history = log_history
        self.records = records
        self.trainer_state_path = trainer_state_path
        self.clinic_log_path = clinic_log_path

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["type"] == kind]

    @property
    def run_start(self) -> dict:
        starts = self.of_type("run_start")
        return starts[0] if starts else {}

    def train_logs(self) -> list[dict]:
        return [h for h in self.log_history if _log_kind(h) == "train"]

    def eval_logs(self) -> list[dict]:
        return [h for h in self.log_history if _log_kind(h) == "eval"]


def _checkpoint_number(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)", path)
    return int(match.group(1)) if match else -1


def _find_trainer_state(run_dir: str) -> str | None:
    direct = os.path.join(run_dir, "trainer_state.json")
    if os.path.isfile(direct):
        return direct
    candidates = glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json"))
    return max(candidates, key=_checkpoint_number) if candidates else None


def _merge_logs(state_logs: Iterable[dict], clinic_logs: Iterable[dict]) -> list[dict]:
    """Union of the two log histories, one entry per (step, kind), the clinic log's (complete) copy winning."""
    merged: dict[tuple, dict] = {}
    for entry in [*state_logs, *clinic_logs]:
        if isinstance(entry.get("step"), (int, float)):
            merged[(int(entry["step"]), _log_kind(entry))] = dict(entry)
    return [merged[k] for k in sorted(merged)]


def _log_kind(entry: dict) -> str:
    if "loss" in entry or "learning_rate" in entry:
        return "train"
    if any(k.startswith("eval_") for k in entry):
        return "eval"
    return "other"


def read_run(run_dir: str) -> RunData:
    """Read a Trainer output directory: `trainer_state.json` (the run's own, else the latest checkpoint's) and the
    clinic log. At least one of them must exist.

    Raises:
        `FileNotFoundError`: `run_dir` does not exist or holds neither file.
        [`ClinicLogError`]: a corrupt `trainer_state.json` or clinic log.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"Run directory not found: {run_dir}")
    state_path = _find_trainer_state(run_dir)
    log_path = os.path.join(run_dir, LOG_NAME)
    log_path = log_path if os.path.isfile(log_path) else None
    if state_path is None and log_path is None:
        raise FileNotFoundError(
            f"{run_dir} holds no trainer_state.json (nor in a checkpoint-*/ folder) and no {LOG_NAME}. Point "
            "`hf-clinic report` at the Trainer's output_dir, after training with `ClinicCallback()` (it writes "
            f"{LOG_NAME}) or after `trainer.save_state()`."
        )
    state_logs: list[dict] = []
    if state_path is not None:
        try:
            with open(state_path, encoding="utf-8") as f:
                state = json.load(f)
        except json.JSONDecodeError as err:
            raise ClinicLogError(f"Corrupt {state_path}: {err.msg} at line {err.lineno}, column {err.colno}") from None
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            raise ClinicLogError(
                f"Corrupt {state_path}: no 'log_history' list (is it a Trainer's trainer_state.json?)"
            )
        state_logs = [h for h in history if isinstance(h, dict)]
    records = read_clinic_log(log_path) if log_path else []
    clinic_logs = [{k: v for k, v in r.items() if k != "type"} for r in records if r["type"] == "log"]
    return RunData(run_dir, _merge_logs(state_logs, clinic_logs), records, state_path, log_path)
