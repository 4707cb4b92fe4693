"""Run an unmodified training script with hf-clinic's optimizer names registered.

Stock scripts such as transformers' `run_glue.py` build `HfArgumentParser(TrainingArguments)` without importing
hf_clinic, so argparse rejects `--optim radam` (`invalid choice`). This launcher imports hf_clinic (which adds every
hf-clinic name to `TrainingArguments.optim`), then runs the script exactly as `python script.py ...` would: as
`__main__`, with `sys.argv` and `sys.path[0]` set the way the interpreter sets them.

```bash
python -m hf_clinic.launch run_glue.py --optim lamb --weight_decay 0.01 ...
python -m hf_clinic.launch -m my_package.train --optim radam ...
accelerate launch -m hf_clinic.launch run_glue.py --optim lamb ...
```

`accelerate launch` starts one interpreter per process; each runs this launcher, so the names exist on every rank.
"""

import os
import runpy
import sys


__all__ = ["main"]

USAGE = """\
usage: python -m hf_clinic.launch SCRIPT.py [script arguments ...]
       python -m hf_clinic.launch -m MODULE [script arguments ...]

Imports hf_clinic (registering its optimizer names: {names}),
then runs SCRIPT.py or MODULE as __main__ with the remaining arguments, e.g.

  python -m hf_clinic.launch run_glue.py --optim lamb --weight_decay 0.01 ...
  accelerate launch -m hf_clinic.launch run_glue.py --optim radam ...
"""


def _usage() -> str:
    from hf_clinic.integrations.transformers import trainer_optimizer_names

    return USAGE.format(names=", ".join(trainer_optimizer_names()))


def main(argv: list[str] | None = None) -> None:
    """Import hf_clinic, then run a script (or `-m module`) as `__main__` with the remaining arguments.

    Args:
        argv (`list[str]`, *optional*, defaults to `sys.argv[1:]`):
            `["script.py", *args]` or `["-m", "package.module", *args]`.

    Raises:
        `SystemExit`: With status 2 and a usage message when no script is given or the script does not exist.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write(_usage())
        raise SystemExit(0 if argv else 2)

    import hf_clinic  # noqa: F401  (registration happens on import)

    if argv[0] == "-m":
        if len(argv) < 2:
            sys.stderr.write("hf_clinic.launch: -m needs a module name\n\n" + _usage())
            raise SystemExit(2)
        module, args = argv[1], argv[2:]
        # `python -m pkg.mod` puts the working directory first on sys.path; runpy sets argv[0] to the file.
        sys.path.insert(0, os.getcwd())
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return

    script, args = argv[0], argv[1:]
    if not os.path.isfile(script):
        sys.stderr.write(f"hf_clinic.launch: no such script: {script!r}\n\n" + _usage())
        raise SystemExit(2)
    # `python script.py` puts the script's folder first on sys.path, so the script's sibling imports keep working.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *args]
    # run_path installs a temporary `__main__` module, so dataclasses and `get_type_hints` in the script resolve
    # their own globals (HfArgumentParser relies on that).
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
