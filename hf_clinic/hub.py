"""Publishing hf-clinic models on the Hub: stock checkpoints, with a model card that tells how they were trained.

`Trainer.push_to_hub` uploads the output folder as it is: for a model trained with Admin that is a checkpoint with
extra `admin_omega` parameters, which stock `from_pretrained` drops silently (wrong outputs), plus a pickled
`training_args.bin`. This module publishes what a user of the Hub needs instead:

1. [`save_for_hub`] writes a folder with the model exported to a stock checkpoint (Admin's ω folded exactly into
   the LayerNorm and linear weights by `hf_clinic.admin.save_vanilla`), the tokenizer, the model card
   (`README.md`) and the metrics JSON files; [`check_stock_folder`] refuses any folder that still holds Admin state.
2. [`verify_stock_export`] reloads that folder with the stock transformers class and checks that it computes what
   the trained model computes (logits, and greedy generations for generative models).
3. [`push_folder_to_hub`] creates the repository and uploads that folder with `huggingface_hub.HfApi` (one
   commit, checkpoints and pickles left out).

[`publish_from_trainer`] does all of it for a finished `transformers.Trainer`, with the model card rendered by
`hf_clinic.cards` from the run itself; the recipes call it on the main process after training.

NOTE: the model card is validated by the Hub on upload (`/api/validate-yaml`); locally only the `model-index`
structure is checked (by `huggingface_hub.ModelCardData`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard

from .admin import MARKER_KEY, OMEGA_NAME, has_admin, save_vanilla
from .cards import record_from_trainer, render_model_card


__all__ = [
    "HUB_IGNORE_PATTERNS",
    "check_stock_folder",
    "publish_from_trainer",
    "push_folder_to_hub",
    "save_for_hub",
    "verify_stock_export",
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
            admin_keys = [k for k in f.keys() if k.endswith(OMEGA_NAME) or k.endswith(MARKER_KEY)]
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


def verify_stock_export(model, folder: str | os.PathLike, batch: dict, *, atol: float = 1e-4) -> str:
    """Check that the stock checkpoint in `folder` computes what the trained `model` computes.

    The folder is reloaded with the stock transformers class named in its `config.json` (`architectures`), as a
    user of the Hub would load it, and run on `batch` next to `model`: the logits must agree within `atol` and, for a
    model that generates, greedy generations must be identical.

    Args:
        model (`transformers.PreTrainedModel`): the trained model (unwrapped from DDP), with or without Admin.
        folder (`str` or `os.PathLike`): a folder written by [`save_for_hub`].
        batch (`dict[str, torch.Tensor]`): a collated batch, e.g. a few dev examples; `labels` are passed on (a
            seq2seq model builds its decoder inputs from them).
        atol (`float`, *optional*, defaults to `1e-4`): the largest accepted |Δlogits|.

    Returns:
        `str`: what was checked, for the model card (`TrainingRecord.export_check`).

    Raises:
        `RuntimeError`: the reloaded checkpoint computes something else.
    """
    import torch
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or [type(model).__name__])[0]
    stock = getattr(transformers, architecture).from_pretrained(str(folder)).eval()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            ours = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            theirs = stock(**{k: v.cpu() for k, v in batch.items()}).logits.float()
            diff = float((ours - theirs).abs().max())
            same_generations = None
            if stock.can_generate():
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
                greedy = copy.deepcopy(model.generation_config)
                greedy.update(num_beams=1, do_sample=False, max_length=32, max_new_tokens=None)
                same_generations = torch.equal(
                    model.generate(**{k: v.to(device) for k, v in inputs.items()}, generation_config=greedy).cpu(),
                    stock.generate(**inputs, generation_config=greedy),
                )
    finally:
        model.train(was_training)
    if not diff <= atol or same_generations is False:
        raise RuntimeError(
            f"The stock export in {str(folder)!r} differs from the trained model: max |Δlogits| = {diff:.3g} "
            f"(accepted: {atol:g})"
            + ("" if same_generations is None else f", identical greedy outputs: {same_generations}")
        )
    n = len(next(iter(batch.values())))
    check = f"reloaded with stock `{architecture}`, max |Δlogits| = {diff:.1e}"
    if same_generations:
        check += " and identical greedy generations"
    return check + f" on {n} examples"


def publish_from_trainer(
    trainer,
    *,
    verify_batch: dict,
    push_to_hub: bool = False,
    output_dir: str | os.PathLike | None = None,
    **record_fields,
) -> CommitInfo | None:
    """Publish a finished `transformers.Trainer` run: stock export, model card, and (optionally) the Hub.

    Writes into `output_dir` the model exported to a stock checkpoint with its tokenizer ([`save_for_hub`]),
    checks the export ([`verify_stock_export`]), renders the model card from the run
    (`hf_clinic.cards.record_from_trainer` + `render_model_card`) as `README.md`, and with `push_to_hub` uploads the
    folder ([`push_folder_to_hub`]) to `args.hub_model_id` (default: the folder's name) with `args.hub_token`,
    `args.hub_private_repo` and `args.hub_revision`. Call it on the main process only, after `trainer.train()`; set
    `args.push_to_hub=False` for the run itself, or the Trainer uploads its own (Admin) checkpoints.

    Args:
        trainer (`transformers.Trainer`): the trainer after `train()`.
        verify_batch (`dict[str, torch.Tensor]`): a collated batch the export is checked on.
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the folder.
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `args.output_dir`): the folder to write.
        record_fields: the `hf_clinic.cards.TrainingRecord` fields that the run cannot tell (`task_type`,
            `dataset_id`, `dataset_name`, `results`, `clip`, `admin_report`, `command`, ...); `model_name` defaults
            to the repository id.

    Returns:
        `huggingface_hub.CommitInfo` or `None`: the commit, when pushed.
    """
    args = trainer.args
    folder = Path(output_dir or args.output_dir)
    repo_id = args.hub_model_id or folder.name
    save_for_hub(trainer.model, folder, tokenizer=trainer.processing_class)
    export_check = verify_stock_export(trainer.model, folder, verify_batch)
    record_fields.setdefault("model_name", repo_id)
    record = record_from_trainer(trainer, stock_export=True, export_check=export_check, **record_fields)
    render_model_card(record).save(str(folder / "README.md"))
    logger.info("Model card written to %s", folder / "README.md")
    if not push_to_hub:
        return None
    commit = push_folder_to_hub(
        folder, repo_id, token=args.hub_token, private=args.hub_private_repo, revision=args.hub_revision
    )
    logger.info("Pushed %s to %s", folder, commit.commit_url)
    return commit
