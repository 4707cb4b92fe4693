"""A Python process in which hf_clinic cannot be imported (an import hook refuses it), as on a machine without it.

Usage: python integ_without_hf_clinic.py TRAINING_ARGS_BIN STOCK_SCRIPT [stock script arguments ...]

1. Unpickles a checkpoint's `training_args.bin` written by a run with an hf-clinic optimizer name.
2. Runs the stock script with the remaining arguments (expected to be rejected by argparse: `--optim radam`).

Prints one JSON line with what it saw.
"""

import contextlib
import importlib.abc
import io
import json
import runpy
import sys


class RefuseHfClinic(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_clinic" or name.startswith("hf_clinic."):
            raise ImportError(f"{name} is not available in this process")
        return None


sys.meta_path.insert(0, RefuseHfClinic())


def main():
    training_args_bin, script, *script_args = sys.argv[1:]
    import torch

    args = torch.load(training_args_bin, weights_only=False)
    as_dict = args.to_dict()
    result = {
        "optim": args.optim,
        "optim_type": type(args.optim).__name__,
        "optim_args": args.optim_args,
        "dict_optim": as_dict["optim"],
        "learning_rate": args.learning_rate,
    }

    stderr = io.StringIO()
    sys.argv = [script, *script_args]
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
            result["script_exit_code"] = 0
        except SystemExit as exit_info:
            result["script_exit_code"] = exit_info.code
    result["script_stderr"] = stderr.getvalue()[-2000:]
    result["hf_clinic_imported"] = any(m == "hf_clinic" or m.startswith("hf_clinic.") for m in sys.modules)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
