"""Checkpoints: read without running code, turned back into model, config and data (run.Run writes them).

A checkpoint is a dict: `model`, `optimizer`, `schedule` state dicts, `state` (epoch, best
validation NDCG@10 and its epoch, evaluations without improvement), `config` (the resolved config
as a dict), `metadata` (the token <-> MovieLens id map), and `generator`, the state of the shuffle's
random numbers (the other draws are seeded anew each epoch: training.seed_epoch).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from build import build_model
from config import Config, apply_overrides, changed_settings, config_from_dict, declared_keys
from data import DatasetMetadata, MovieLensData, load_movielens
from errors import CheckpointError, ConfigError
from movielens_transformer import MovieLensTransformer
from releases import ensure_movielens


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict; weights_only, so a file holding code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a run's folder, best.pt or last.pt{runs_beside(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load reports a bad file as one of several error types
        raise CheckpointError(f"{path} is not a checkpoint of this repo or is damaged (torch.load: "
                              f"{type(e).__name__}); give a best.pt or last.pt written by model_train.py") from None
    missing = {"model", "config", "metadata"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (it lacks {', '.join(sorted(missing))}); "
                              "give a best.pt or last.pt written by model_train.py")
    misfit = misfit_field(checkpoint)
    if misfit:
        raise CheckpointError(f"{path} is damaged or not of this repo: {misfit}; give a best.pt or last.pt "
                              "written by model_train.py")
    return checkpoint


# each field's type as model_train.py writes it (the optional ones are a last.pt's, for resuming)
FIELDS = {"model": dict, "config": dict, "metadata": dict, "state": dict, "optimizer": dict, "schedule": dict,
          "generator": torch.Tensor}
STATE = {"epoch": int, "best_ndcg": (int, float), "stale": int}


def misfit_field(checkpoint: dict) -> str:
    """What in a checkpoint is not of the type model_train.py writes ("" when nothing)."""
    for field, kind in FIELDS.items():
        if field in checkpoint and not isinstance(checkpoint[field], kind):
            return f"its {field} is a {type(checkpoint[field]).__name__}"
    if not all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values()):
        return "its model holds something other than tensors"
    for key, kind in STATE.items():
        if "state" in checkpoint and not isinstance(checkpoint["state"].get(key), kind):
            return f"its state's {key} is {checkpoint['state'].get(key)!r}"
    try:
        DatasetMetadata.from_dict(checkpoint["metadata"])
    except TypeError as e:
        return f"its metadata does not fit ({e})"
    return ""


def runs_beside(path: Path) -> str:
    """`; runs in models: a, b` for the run folders with a checkpoint near a path that has none
    (python model_train.py writes them to models/<run>/)."""
    for models in (path.parent, path.parent.parent):
        if models.is_dir():
            runs = sorted(run.name for run in models.iterdir() if (run / "best.pt").is_file() or (run / "last.pt").is_file())
            if runs:
                more = f" and {len(runs) - 10} more" if len(runs) > 10 else ""
                return f"; runs in {models}: {', '.join(runs[:10])}{more}"
    return " (python model_train.py writes them to models/<run>/)"


def saved_config(checkpoint: dict, overrides: list[str] = (), source: str = "checkpoint config") -> Config:
    """The config a checkpoint was trained with, with `--set` overrides applied. Keys added since
    take their defaults; a key an earlier version had and this one renamed or dropped is a
    ConfigError: that checkpoint belongs to its own version of the repo."""
    raw = copy.deepcopy(checkpoint["config"])
    return config_from_dict(raw, apply_overrides(raw, overrides, source, old_key_remedy=OLD_CHECKPOINT))


OLD_CHECKPOINT = ("the checkpoint was written by an earlier version of this repo: read it with that version "
                  "(git checkout an older commit), or train it anew")


def resume_config(checkpoint: dict, overrides: list[str], source: str) -> tuple[Config, list[str]]:
    """The config to continue a run with: the checkpoint's, with `--set` overrides of the keys a
    resumed run may change (keys.key's resume), and a line for each value that changes. Any other
    key (the model's shape, the split, the batch size, the optimizer, the seed) cannot change
    mid-run: a ConfigError names it."""
    config = saved_config(checkpoint, overrides, source)
    changes, declared = [], declared_keys()
    for key, (before, value) in changed_settings(saved_config(checkpoint), config).items():
        if not declared[key].resume:
            raise ConfigError(f"{key} cannot change when a run is resumed (from --set: {before!r} -> "
                              f"{value!r}); start a new run to change it")
        changes.append(f"{key} {before!r} -> {value!r}")
    return config, changes


def model_from_checkpoint(checkpoint: dict, source: str = "the checkpoint"
                          ) -> tuple[MovieLensTransformer, Config, DatasetMetadata]:
    """The trained model in eval mode on the CPU, its config and its data set's metadata."""
    config = saved_config(checkpoint)
    metadata = DatasetMetadata.from_dict(checkpoint["metadata"])
    model = build_model(config, metadata)
    load_weights(model, checkpoint["model"], source)
    return model.eval(), config, metadata


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """A checkpoint's weights into a model built from its config, or a CheckpointError that names
    the first weight that does not fit, or that holds NaN or infinity (a run that diverged)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        more = f" and {len(details) - 1} more" if len(details) > 1 else ""
        raise CheckpointError(f"{source}: its weights do not fit the model its config builds ("
                              f"{(details or [str(e)])[0].rstrip('.')}{more}); give a checkpoint of this repo's model, "
                              "unedited") from None
    broken = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} of its weights hold NaN or infinity ({broken[0]} first): "
                              "the run diverged or the file is damaged; give another checkpoint")


def data_for_checkpoint(config: Config, metadata: DatasetMetadata, data_dir: Optional[str] = None) -> MovieLensData:
    """The tokenized data a checkpoint was trained on (from its config's data_dir, or data_dir)."""
    if data_dir:
        config.trainer_config.data_dir = data_dir
    tc = config.trainer_config
    data = load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    check_same_data(metadata, data.metadata, "the checkpoint", tc.data_dir)
    return data


def check_same_data(saved: DatasetMetadata, loaded: DatasetMetadata, what: str, data_dir: str) -> None:
    """A CheckpointError naming both data sets when `what` was trained on other data than data_dir holds."""
    if not saved.same_data(loaded):
        raise CheckpointError(f"{what} was trained on {saved.name} ({saved.num_users:,} users, {saved.num_movies:,} "
                              f"movies); {data_dir} holds {loaded.name} ({loaded.num_users:,} users, "
                              f"{loaded.num_movies:,} movies); give the folder it was trained on")
