"""Publishing hf-clinic models on the Hugging Face Hub as stock checkpoints with a card that tells how they were trained.

`Trainer.push_to_hub` uploads the output folder as it is: for a model trained with Admin that is a checkpoint with
extra `admin_omega` parameters, which stock `from_pretrained` drops silently (wrong outputs), plus a pickled
`training_args.bin`. This module publishes what a user of the Hub needs instead:

1. [`save_for_hub`] writes a folder with the model exported to a stock checkpoint (Admin's ω folded exactly into
   the LayerNorm and linear weights by `hf_clinic.admin.save_vanilla`), the tokenizer, the model card
   (`README.md`) and the metrics JSON files; [`check_stock_folder`] refuses any folder that still holds Admin state.
2. [`push_folder_to_hub`] creates the repository and uploads that folder with `huggingface_hub.HfApi` (one
   commit, checkpoints and pickles left out).

NOTE: the model card is validated by the Hub on upload (`/api/validate-yaml`); locally only the `model-index`
structure is checked (by `huggingface_hub.ModelCardData`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard

from .admin import has_admin, save_vanilla


__all__ = [
    "HUB_IGNORE_PATTERNS",
    "check_stock_folder",
    "push_folder_to_hub",
    "save_for_hub",
]

logger = logging.getLogger(__name__)

# Never uploaded: Trainer checkpoints (Admin state, optimizer moments), TensorBoard runs, and pickles, which may
# need hf_clinic to unpickle (`training_args.bin`).
HUB_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "admin_checkpoint/**",
    "runs/**",
    "_*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "trainer_state.json",
]


def save_for_hub(
    model,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    card: ModelCard | None = None,
) -> Path:
    """Write a publishable folder: a stock checkpoint, the tokenizer and the model card.

    A model with Admin is exported with `hf_clinic.admin.save_vanilla` (ω folded into standard weights, so the
    result loads with plain `AutoModel*.from_pretrained`); any other model with `save_pretrained`.

    Args:
        model (`transformers.PreTrainedModel`): the trained model (unwrapped from DDP).
        save_directory (`str` or `os.PathLike`): the folder to write; created if missing.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved next to the weights.
        card (`huggingface_hub.ModelCard`, *optional*): saved as `README.md`.

    Returns:
        `Path`: the folder.

    Raises:
        `ValueError`: the written folder still holds Admin state (see [`check_stock_folder`]).
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    if has_admin(model):
        save_vanilla(model, str(save_directory))
    else:
        model.save_pretrained(str(save_directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(save_directory))
    if card is not None:
        card.save(str(save_directory / "README.md"))
    check_stock_folder(save_directory)
    return save_directory


def check_stock_folder(folder: str | os.PathLike) -> None:
    """Raise if `folder` is not a stock checkpoint: no `config.json`, or Admin parameters / markers left in it.

    Raises:
        `FileNotFoundError`: `folder` has no `config.json`.
        `ValueError`: a weight named `*admin_omega`, or an `admin` / `hf_clinic_admin` entry in `config.json`.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no config.json; it is not a saved model")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    markers = sorted(k for k in config if "admin" in k.lower())
    if markers:
        raise ValueError(
            f"{str(config_path)!r} still marks an Admin checkpoint ({', '.join(markers)}); export it with "
            "hf_clinic.admin.save_vanilla before publishing"
        )
    for weights in sorted(folder.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            admin_keys = [k for k in f.keys() if k.endswith("admin_omega") or k.startswith("HF_CLINIC_ADMIN")]
        if admin_keys:
            raise ValueError(
                f"{str(weights)!r} holds Admin parameters ({admin_keys[0]}, ...), which stock from_pretrained "
                "drops silently; export with hf_clinic.admin.save_vanilla before publishing"
            )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create `repo_id` (if needed) and upload `folder` to it in one commit.

    Args:
        folder (`str` or `os.PathLike`): a folder written by [`save_for_hub`] (checked with [`check_stock_folder`]).
        repo_id (`str`): `namespace/name` on the Hub.
        token (`str`, *optional*): a Hub token; defaults to the locally saved one.
        private (`bool`, *optional*): visibility of a newly created repository.
        revision (`str`, *optional*): the branch to commit to.
        commit_message (`str`, *optional*): defaults to "Upload model trained with hf-clinic".
        ignore_patterns (`list[str]`, *optional*, defaults to `HUB_IGNORE_PATTERNS`): files never uploaded.

    Returns:
        `huggingface_hub.CommitInfo`: the commit on the Hub.
    """
    from . import __version__

    check_stock_folder(folder)
    if not (Path(folder) / "README.md").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no README.md model card; render one with hf_clinic.cards")
    api = HfApi(token=token, library_name="hf_clinic", library_version=__version__)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %s to %s", folder, url)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload model trained with hf-clinic",
        ignore_patterns=HUB_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns,
    )
