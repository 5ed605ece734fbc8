"""What a config builds: the device, the data sets and the model.

Scripts build through here; the config itself (config.py) only reads and checks values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from config import Config, origin
from data import (YEAR_BUCKETS, DatasetMetadata, HistoryChunks, MovieLensData, MovieLensSequenceDataset,
                  load_movielens, movie_feature_tensors)
from errors import ConfigError
from movielens_transformer import Features, MovieLensTransformer
from releases import ensure_movielens
from text import text_embeddings


def pick_device(name: str) -> torch.device:
    """'auto': CUDA, then MPS, then the CPU; a named device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"the device is {name!r} but CUDA is not available; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("the device is 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def build_model(config: Config, metadata: DatasetMetadata) -> MovieLensTransformer:
    """The model for this data: vocabulary and user count come from the data set, and so do the
    movie and user features a config asks for."""
    mc = config.model_config
    mc.transformer_config.vocab_size = metadata.vocab_size
    mc.num_users = metadata.num_users
    return MovieLensTransformer(mc, model_features(config, metadata) if mc.movie_features or mc.user_features else None)


def model_features(config: Config, metadata: DatasetMetadata) -> Features:
    """The features the model reads, from the data set's metadata; a user feature that the release
    does not have is a ConfigError naming it."""
    missing = [name for name in config.model_config.user_features if name not in metadata.user_features]
    if missing:
        key = "model_config.user_features"
        raise ConfigError(f"{key} asks for {', '.join(missing)} (from {origin(config, key)}), which {metadata.name} "
                          f"does not have (it has no users file, or one without them); remove "
                          f"{'it' if len(missing) == 1 else 'them'}")
    genres, years = movie_feature_tensors(metadata)
    return Features(genres, years, YEAR_BUCKETS, {name: torch.tensor(values)
                                                  for name, values in metadata.user_features.items()},
                    text=movie_text(config, metadata) if "text" in config.model_config.movie_features else None)


def movie_text(config: Config, metadata: DatasetMetadata) -> torch.Tensor:
    """Each movie's text embedding, kept beside the data cache when the config caches and its data
    folder is there (a checkpoint evaluated elsewhere computes them anew from its titles)."""
    tc = config.trainer_config
    folder = Path(tc.data_dir)
    return text_embeddings(metadata, config.model_config.text_model, folder if tc.cache and folder.is_dir() else None)


def make_datasets(config: Config, data: Optional[MovieLensData] = None) -> dict:
    """train, validation and test subsets of the configured split, sharing one parsed data set.

    Validation and test are next-movie windows of the context's length in either mode; the
    window mode trains on such windows, the sequence mode on HistoryChunks.
    """
    tc, mc = config.trainer_config, config.model_config
    data = data or load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    c = mc.transformer_config.context_window_size
    datasets = {subset: MovieLensSequenceDataset(data, subset, c, tc.window_stride, tc.split, tc.seed)
                for subset in ("validation", "test")}
    if len(datasets["validation"]) == 0:
        raise ConfigError(f"no validation targets in {tc.data_dir} with trainer_config.split {tc.split}: "
                          "leave_one_out needs users with at least 3 ratings (the last is for test, the one "
                          "before for validation); give a data set that has some")
    longest = int(data.lengths.max())
    key = "model_config.transformer_config.context_window_size"
    if c > longest + 1:
        raise ConfigError(f"{key} is {c} (from {origin(config, key)}), longer than every history in {tc.data_dir} "
                          f"(the longest: {longest:,} ratings); it must be at most {longest + 1:,} (SOS included)")
    datasets["train"] = (HistoryChunks(data, c, tc.pack_chunks) if mc.mode == "sequence" else
                         MovieLensSequenceDataset(data, "train", c, tc.window_stride, tc.split, tc.seed))
    if len(datasets["train"]) == 0:
        raise ConfigError(f"no training targets in {tc.data_dir} with {key} {c} (from {origin(config, key)}); "
                          "a shorter context leaves some")
    return datasets
