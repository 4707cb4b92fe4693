# ######################################################################################################################
# What the hf-clinic recipes (glue.py, translation.py) share on the command line:
#   - the hf-clinic flags, `ClinicArguments` (--admin, --admin_omega, --clip_policy, --clip_args), and the Trainer
#     callbacks they ask for (`clinic_callbacks`);
#   - `--resume_from_checkpoint last` (`resolve_checkpoint`);
#   - `--push_to_hub`, which the recipes do themselves after training (`take_push_to_hub`);
#   - clear errors for a model path that is neither a saved model nor a Hub id (`load_model_config`).
# Publishing (stock export, model card, --push_to_hub) is `hf_clinic.hub.publish_from_trainer`.
#
# The recipes import it as a sibling module: `python recipes/glue.py` and `accelerate launch recipes/glue.py` put
# recipes/ first on sys.path.
# ######################################################################################################################

import os
import re
from dataclasses import dataclass, field

from transformers import AutoConfig
from transformers.trainer_utils import get_last_checkpoint


__all__ = [
    "ClinicArguments",
    "clinic_callbacks",
    "load_model_config",
    "resolve_checkpoint",
    "take_push_to_hub",
]

# `namespace/name` or `name`, as the Hub allows them
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ClinicArguments:
    """The hf-clinic flags of the recipes (defaults for fine-tuning a pretrained checkpoint)."""

    admin: bool = field(
        default=False,
        metadata={
            "help": "Apply Admin (adaptive model initialization) to the Post-LN residuals via AdminCallback; "
            "the published checkpoint is the exact stock export."
        },
    )
    admin_omega: str = field(
        default="1.0",
        metadata={
            "help": "Initial ω: a number, `profile` (profiled on the Trainer's first batches) or `closed_form`. "
            "Default 1: a fine-tuned checkpoint keeps exactly its pretrained function and ω is then trained. "
            "Admin's profiling is meant for models trained from scratch; on the pretrained MiniLM it gives ω up "
            "to 3.8 and changes the last hidden states by 78 percent."
        },
    )
    clip_policy: str | None = field(
        default=None,
        metadata={
            "help": "hf-clinic clipping policy (ClipAwareCallback): fixed, step_length, percentile, zscore, "
            "unitwise. Default: the Trainer's built-in clipping at --max_grad_norm."
        },
    )
    clip_args: str | None = field(
        default=None,
        metadata={"help": "Policy settings as `key=value,key=value`, e.g. `z_thresh=2.5,warmup_steps=10`."},
    )


def _omega(text: str):
    """`--admin_omega`: `profile`, `closed_form`, or a number (a constant initial ω)."""
    try:
        return float(text)
    except ValueError:
        return text


def clinic_callbacks(clinic: ClinicArguments) -> tuple[list, object | None, object | None]:
    """The hf-clinic callbacks a run asks for: (callbacks, the Admin callback or None, the clip callback or None)."""
    callbacks, admin_cb, clip_cb = [], None, None
    if clinic.admin:
        from hf_clinic.admin import AdminCallback

        admin_cb = AdminCallback(omega=_omega(clinic.admin_omega))
        callbacks.append(admin_cb)
    if clinic.clip_policy:
        from hf_clinic.clipping import ClipAwareCallback
        from hf_clinic.key_values import parse_key_values

        clip_cb = ClipAwareCallback(clinic.clip_policy, **parse_key_values(clinic.clip_args, option="--clip_args"))
        callbacks.append(clip_cb)
    return callbacks, admin_cb, clip_cb


def resolve_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, `last` (the newest `checkpoint-*` in output_dir) or None."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "last":
        out = training_args.output_dir
        checkpoint = get_last_checkpoint(out) if os.path.isdir(out) else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* in {out!r}")
    elif checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint!r} does not exist")
    return checkpoint


def take_push_to_hub(training_args) -> bool:
    """Take `--push_to_hub` away from the Trainer and return it: the recipe publishes the stock export and its card
    itself (`hf_clinic.hub.publish_from_trainer`), while the Trainer would upload its own checkpoints (with Admin's
    ω, which stock `from_pretrained` drops). It publishes the model this run trains, so it needs `--do_train`."""
    if training_args.push_to_hub and not training_args.do_train:
        raise ValueError(
            "--push_to_hub publishes the model this run trains and needs --do_train; to publish an existing "
            "folder, use hf_clinic.hub.push_folder_to_hub"
        )
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    return push_to_hub


def load_model_config(model_name_or_path: str, **kwargs):
    """`AutoConfig.from_pretrained`, with clear errors for a path that is neither a saved model nor a Hub id."""
    if os.path.isdir(model_name_or_path) and not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise FileNotFoundError(
            f"--model_name_or_path {model_name_or_path!r} has no config.json; it is not a saved model"
        )
    if not os.path.isdir(model_name_or_path) and not _HUB_ID.match(model_name_or_path):
        raise FileNotFoundError(f"--model_name_or_path {model_name_or_path!r} is not an existing folder nor a Hub id")
    try:
        return AutoConfig.from_pretrained(model_name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load the model config from {model_name_or_path!r}: neither a local folder nor a reachable "
            f"Hub repository ({err})"
        ) from err
