"""Checkpoints: written atomically, read without running code, turned back into model and data.

A checkpoint is a dict: `model`, `optimizer`, `schedule` state dicts, `state` (epoch, best
validation NDCG@10, evaluations without improvement), `config` (the resolved config as a dict),
`metadata` (the token <-> MovieLens id map), and the random states `generator` and `rng`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from config import Config, apply_override, build_model, config_from_dict, upgrade_saved_config
from data import DatasetMetadata, MovieLensData, ensure_movielens, load_movielens
from movielens_transformer import MovieLensTransformer


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside path, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict; weights_only, so a file holding code is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_config(checkpoint: dict, overrides: list[str] = (), source: str = "checkpoint config") -> Config:
    """The config a checkpoint was trained with (keys of earlier versions upgraded), with
    `--set` overrides applied."""
    raw = upgrade_saved_config(checkpoint["config"])
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw, source)


def model_from_checkpoint(checkpoint: dict) -> tuple[MovieLensTransformer, Config, DatasetMetadata]:
    """The trained model in eval mode on the CPU, its config and its data set's metadata."""
    config = saved_config(checkpoint)
    metadata = DatasetMetadata.from_dict(checkpoint["metadata"])
    model = build_model(config, metadata)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config, metadata


def data_for_checkpoint(config: Config, metadata: DatasetMetadata, data_dir: Optional[str] = None) -> MovieLensData:
    """The tokenized data a checkpoint was trained on (from its config's data_dir, or data_dir)."""
    if data_dir:
        config.trainer_config.data_dir = data_dir
    tc = config.trainer_config
    data = load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    if data.metadata != metadata:
        raise ValueError(f"{tc.data_dir} is not the data set this checkpoint was trained on")
    return data
