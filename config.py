"""The training config (YAML, strict) and what it builds: the device, the data sets and the model.

A config file has two sections, `model_config` (movielens_transformer's dataclasses) and
`trainer_config` (TrainerConfig below); `--set section.key=value` overrides one value. An unknown
or mistyped key is an error that names it, and so is a key this repo has renamed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import dacite
import torch
import yaml

from data import DatasetMetadata, MovieLensData, MovieLensSequenceDataset, SequenceChunks, ensure_movielens, load_movielens
from movielens_transformer import MovieLensTransformer, MovieLensTransformerConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "training_config.yaml"


@dataclass
class TrainerConfig:
    data_dir: str = "data/ml-1m"
    cache: bool = True                   # keep the tokenized data beside the raw files
    split: str = "leave_one_out"         # or random_windows: the post's leaky split
    window_stride: int = 1               # positions between the targets of consecutive training windows
    batch_size: int = 512
    eval_batch_size: int = 1024
    learning_rate: float = 1e-3
    optimizer: str = "adam"              # or adamw (decoupled weight decay)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"        # or cosine: decay to min_lr_ratio x lr by num_epochs
    warmup_steps: int = 0                # linear warm-up from 0
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = None    # max global gradient norm; null: no clipping
    label_smoothing: float = 0.0
    num_epochs: int = 1000               # upper bound; early stopping usually ends sooner
    patience: Optional[int] = 5          # evaluations without a better NDCG@10; null: never stop
    eval_every: int = 1                  # epochs between validation HR/NDCG/MRR@10
    log_every: int = 100                 # steps between training-loss log points
    device: str = "auto"                 # auto: cuda, then mps, then cpu
    # speed (speed.speed_settings decides each null from the device and the batches)
    compile: Optional[bool] = None       # torch.compile the training loss and validation
    bf16: Optional[bool] = None          # bf16 autocast in the training loss
    cuda_graph: Optional[bool] = None    # replay the whole training step as one CUDA graph
    seed: int = 42
    tensorboard_dir: str = "runs"
    model_dir: str = "models"
    run_name: Optional[str] = None       # default: a time stamp


@dataclass
class Config:
    model_config: MovieLensTransformerConfig = field(default_factory=MovieLensTransformerConfig)
    trainer_config: TrainerConfig = field(default_factory=TrainerConfig)


# keys of earlier versions: a config file naming one is an error that names what replaced it;
# a checkpoint's saved config is upgraded (upgrade_saved_config)
RENAMED = {("trainer_config", "window_size"): "window_stride"}
REMOVED = {("trainer_config", "compile_mode"): "the captured CUDA-graph step (trainer_config.cuda_graph) "
                                               "replaced torch.compile's modes"}


def check_old_keys(raw: dict, source: str) -> None:
    for (section, key), new in RENAMED.items():
        if key in (raw.get(section) or {}):
            raise ValueError(f"{source}: {section}.{key} is now called {section}.{new}")
    for (section, key), why in REMOVED.items():
        if key in (raw.get(section) or {}):
            raise ValueError(f"{source}: {section}.{key} is no longer a setting: {why}")


def upgrade_saved_config(raw: dict) -> dict:
    """A checkpoint's config with the keys of earlier versions renamed or dropped."""
    for (section, key), new in RENAMED.items():
        if key in raw.get(section, {}):
            raw[section][new] = raw[section].pop(key)
    for section, key in REMOVED:
        raw.get(section, {}).pop(key, None)
    return raw


def config_from_dict(raw: dict, source: str) -> Config:
    """Strict dacite conversion: an unknown or mistyped key is an error that names it."""
    check_old_keys(raw, source)
    try:
        return dacite.from_dict(Config, raw, config=dacite.Config(strict=True))
    except dacite.DaciteError as e:
        raise ValueError(f"{source}: {e}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Set raw['a']['b'] from 'a.b=value', the value parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] = ()) -> Config:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw, str(path))


def pick_device(name: str) -> torch.device:
    """'auto': CUDA, then MPS, then the CPU; a named device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer_config.device is {name!r} but CUDA is not available")
    return torch.device(name)


def build_model(config: Config, metadata: DatasetMetadata) -> MovieLensTransformer:
    """The model for this data: vocabulary and user count come from the data set."""
    config.model_config.transformer_config.vocab_size = metadata.vocab_size
    config.model_config.num_users = metadata.num_users
    return MovieLensTransformer(config.model_config)


def make_datasets(config: Config, data: Optional[MovieLensData] = None) -> dict:
    """train, validation and test subsets of the configured split, sharing one parsed data set.

    Validation and test are next-movie windows of the context's length in either mode; the
    window mode trains on such windows, the sequence mode on SequenceChunks.
    """
    tc, mc = config.trainer_config, config.model_config
    data = data or load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    c = mc.transformer_config.context_window_size
    datasets = {subset: MovieLensSequenceDataset(data, subset, c, tc.window_stride, tc.split, tc.seed)
                for subset in ("validation", "test")}
    datasets["train"] = (SequenceChunks(data, c, tc.split) if mc.mode == "sequence" else
                         MovieLensSequenceDataset(data, "train", c, tc.window_stride, tc.split, tc.seed))
    return datasets
