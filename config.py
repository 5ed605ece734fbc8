"""The training config (YAML, strict) and what it builds: the device, the data sets and the model.

A config file has two sections, `model_config` (movielens_transformer's dataclasses) and
`trainer_config` (TrainerConfig below); `--set section.key=value` overrides one value. An unknown
or mistyped key is an error that names it, and so is a key this repo has renamed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import dacite
import torch
import yaml

from data import (SPLITS, YEAR_BUCKETS, DatasetMetadata, MovieLensData, MovieLensSequenceDataset, HistoryChunks,
                  load_movielens, movie_feature_tensors)
from errors import ConfigError
from movielens_transformer import (INITS, MODES, MOVIE_FEATURES, USER_FEATURES, Features, MovieLensTransformer,
                                   MovieLensTransformerConfig)
from releases import ensure_movielens

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
    rating_weights: Optional[list[float]] = None  # a loss weight per star, 1 to 5 (half stars: the next); null: 1
    loss: str = "full"                   # full: softmax over all movies; sampled: over negatives
    loss_chunk_rows: Optional[int] = None  # full loss in chunks of this many rows (bounds its memory)
    negatives: str = "uniform"           # sampled loss: uniform, or in_batch (logQ-corrected)
    num_negatives: int = 1024            # uniform negatives shared by a batch
    num_epochs: int = 1000               # upper bound; early stopping usually ends sooner
    patience: Optional[int] = 5          # evaluations without a better NDCG@10; null: never stop
    eval_every: int = 1                  # epochs between validation HR/NDCG/MRR@10
    log_every: int = 100                 # steps between training-loss log points
    device: str = "auto"                 # auto: cuda, then mps, then cpu
    # speed (speed.speed_settings decides each null from the device and the batches)
    compile: Optional[bool] = None       # torch.compile the training loss and validation
    bf16: Optional[bool] = None          # bf16 autocast in the training loss
    cuda_graph: Optional[bool] = None    # replay the whole training step as one CUDA graph
    pack_chunks: bool = True             # sequence mode: a batch's short chunks share rows, not padding
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
RENAMED = {"trainer_config.window_size": "trainer_config.window_stride"}
REMOVED = {"trainer_config.compile_mode": "the captured CUDA-graph step (trainer_config.cuda_graph) "
                                          "replaced torch.compile's modes"}


class Origins:
    """Where each config value came from, for error messages: a file, or --set."""

    def __init__(self, source: str, overridden: set[str] = frozenset(), overrides_from: str = "--set"):
        self.source, self.overridden, self.overrides_from = source, overridden, overrides_from

    def __call__(self, key: str) -> str:
        """The origin of key, or of a section that only overrides added (--set section.key=...)."""
        set_here = key in self.overridden or any(k.startswith(f"{key}.") for k in self.overridden)
        return self.overrides_from if set_here else self.source


def check_keys(raw: dict, cls: type, origins: Origins, prefix: str = "") -> None:
    """Every key of raw names a field of the dataclass cls (recursively), as strict dacite wants,
    but with the key's full name, where it came from and the nearest known names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {raw!r} "
                          f"(from {origins(prefix.rstrip('.'))})")
    fields = typing.get_type_hints(cls)
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if name in RENAMED:
            raise ConfigError(f"{name} is now called {RENAMED[name]} (from {origins(name)}); rename it")
        if name in REMOVED:
            raise ConfigError(f"{name} is no longer a setting (from {origins(name)}): {REMOVED[name]}; remove it")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {name} (from {origins(name)}); {hint}")
        if dataclasses.is_dataclass(fields[key]) and value is not None:
            check_keys(value, fields[key], origins, f"{name}.")


def upgrade_saved_config(raw: dict) -> dict:
    """A checkpoint's config with the keys of earlier versions renamed or dropped."""
    for old, new in RENAMED.items():
        (section, key), (_, new_key) = old.split("."), new.split(".")
        if key in raw.get(section, {}):
            raw[section][new_key] = raw[section].pop(key)
    for old in REMOVED:
        section, key = old.split(".")
        raw.get(section, {}).pop(key, None)
    return raw


def config_from_dict(raw: dict, origins: Origins) -> Config:
    """The checked Config of raw: unknown, renamed or mistyped keys and values out of range are
    errors that name the key and where its value came from."""
    check_keys(raw, Config, origins)
    try:
        config = dacite.from_dict(Config, raw, config=dacite.Config(strict=True))
    except dacite.WrongTypeError as e:
        raise ConfigError(f"{e.field_path} is {e.value!r} (from {origins(e.field_path)}), "
                          f"which is not of type {getattr(e.field_type, '__name__', e.field_type)}"
                          f"{number_hint(e.value)}") from None
    except dacite.DaciteError as e:
        raise ConfigError(f"{origins.source}: {e}") from None
    refuse_booleans(config, origins)
    check_values(config, origins)
    config._origins = origins  # not a field: never saved, only for later messages (origin())
    return config


def number_hint(value: object) -> str:
    """A hint for a number that YAML read as a string (PyYAML reads 1e-3, without a dot, as text)."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return f"; write {value!r} with a dot and a signed exponent, e.g. 1.0e-3, for YAML to read a number"


def refuse_booleans(node: object, origins: Origins, prefix: str = "") -> None:
    """true/false where a number is due: dacite takes them, as Python's bool is an int."""
    for name, hint in typing.get_type_hints(type(node)).items():
        value, key = getattr(node, name), f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            refuse_booleans(value, origins, f"{key}.")
        elif hint is not bool and hint != Optional[bool] and (
                isinstance(value, bool) or isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ConfigError(f"{key} is {value!r} (from {origins(key)}), which is not of type "
                              f"{hint if typing.get_origin(hint) else getattr(hint, '__name__', hint)}")


def origin(config: Config, key: str) -> str:
    """Where a config value came from: its file, --set, or a checkpoint."""
    origins = getattr(config, "_origins", None)
    return origins(key) if origins else "the config"


def check_values(config: Config, origins: Origins) -> None:
    """Every value in its range and consistent with the others, so that a bad one fails at once
    rather than after the data has loaded or an epoch has run."""
    mc, tc = config.model_config, config.trainer_config
    t = mc.transformer_config

    def need(ok: bool, key: str, value: object, requirement: str) -> None:
        if not ok:
            raise ConfigError(f"{key} is {value!r} (from {origins(key)}); it must be {requirement}")

    def at_least(section: object, prefix: str, minimum: float, *names: str) -> None:
        for name in names:
            value = getattr(section, name)
            need(value >= minimum, f"{prefix}.{name}", value, f"at least {minimum}")

    def probability(section: object, prefix: str, *names: str) -> None:
        for name in names:
            value = getattr(section, name)
            need(0 <= value < 1, f"{prefix}.{name}", value, "in [0, 1)")

    def one_of(section: object, prefix: str, name: str, choices: tuple) -> None:
        value = getattr(section, name)
        need(value in choices, f"{prefix}.{name}", value, "one of " + ", ".join(map(str, choices)))

    tp, mp, trp = "model_config.transformer_config", "model_config", "trainer_config"
    at_least(t, tp, 1, "context_window_size", "embedding_dimension", "num_layers", "num_heads", "mlp_ratio")
    need(t.embedding_dimension % t.num_heads == 0, f"{tp}.num_heads", t.num_heads,
         f"a divisor of embedding_dimension ({t.embedding_dimension})")
    probability(t, tp, "embedding_dropout", "attention_dropout", "residual_dropout")
    at_least(mc, mp, 0, "user_embedding_dimension")
    need(all(h >= 1 for h in mc.interaction_mlp_hidden_sizes), f"{mp}.interaction_mlp_hidden_sizes",
         mc.interaction_mlp_hidden_sizes, "a list of sizes of at least 1")
    one_of(mc, mp, "mode", MODES)
    one_of(mc, mp, "init", tuple(INITS))
    if mc.tie_output_embeddings:
        last = mc.interaction_mlp_hidden_sizes[-1] if mc.interaction_mlp_hidden_sizes else None
        need(last == t.embedding_dimension, f"{mp}.interaction_mlp_hidden_sizes", mc.interaction_mlp_hidden_sizes,
             f"a list ending in embedding_dimension ({t.embedding_dimension}) when tie_output_embeddings is true")
    need(not mc.query_time or mc.time_bias, f"{mp}.query_time", mc.query_time,
         "false unless model_config.time_bias is true (query time is the time bias's query)")
    for name, choices in (("movie_features", MOVIE_FEATURES), ("user_features", USER_FEATURES)):
        value = getattr(mc, name)
        need(set(value) <= set(choices) and len(set(value)) == len(value), f"{mp}.{name}", value,
             f"a list of distinct names from {', '.join(choices)}")
    need(not mc.user_features or mc.user_embedding_dimension >= 1, f"{mp}.user_features", mc.user_features,
         "[] when user_embedding_dimension is 0 (the features join the user embedding)")
    one_of(tc, trp, "split", SPLITS)
    need(mc.mode != "sequence" or tc.split == "leave_one_out", f"{trp}.split", tc.split,
         "leave_one_out in the sequence mode")
    at_least(tc, trp, 1, "window_stride", "batch_size", "eval_batch_size", "num_epochs", "eval_every", "log_every")
    for name in ("learning_rate", "weight_decay", "min_lr_ratio", "label_smoothing", "grad_clip"):
        value = getattr(tc, name)
        need(value is None or math.isfinite(value), f"{trp}.{name}", value, "a finite number")
    need(tc.learning_rate > 0, f"{trp}.learning_rate", tc.learning_rate, "positive")
    one_of(tc, trp, "optimizer", ("adam", "adamw"))
    at_least(tc, trp, 0, "weight_decay", "warmup_steps")
    one_of(tc, trp, "lr_schedule", ("constant", "cosine"))
    need(0 <= tc.min_lr_ratio <= 1, f"{trp}.min_lr_ratio", tc.min_lr_ratio, "in [0, 1]")
    need(tc.grad_clip is None or tc.grad_clip > 0, f"{trp}.grad_clip", tc.grad_clip, "positive, or null")
    probability(tc, trp, "label_smoothing")
    need(tc.rating_weights is None or len(tc.rating_weights) == 5 and all(
        math.isfinite(w) and w >= 0 for w in tc.rating_weights) and sum(tc.rating_weights) > 0,
        f"{trp}.rating_weights", tc.rating_weights, "null or five weights for 1 to 5 stars, at least 0, not all 0")
    one_of(tc, trp, "loss", ("full", "sampled"))
    one_of(tc, trp, "negatives", ("uniform", "in_batch"))
    at_least(tc, trp, 1, "num_negatives")
    need(tc.loss_chunk_rows is None or tc.loss_chunk_rows >= 1, f"{trp}.loss_chunk_rows", tc.loss_chunk_rows,
         "at least 1, or null")
    need(tc.loss == "full" or tc.label_smoothing == 0, f"{trp}.label_smoothing", tc.label_smoothing,
         "0 with the sampled loss")
    need(tc.patience is None or tc.patience >= 1, f"{trp}.patience", tc.patience, "at least 1, or null")
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", tc.device) is not None, f"{trp}.device", tc.device,
         "auto, cpu, mps, cuda or cuda:N")
    need(tc.run_name is None or re.fullmatch(r"[\w.-]+", tc.run_name) is not None and tc.run_name not in (".", ".."),
         f"{trp}.run_name", tc.run_name, "letters, digits, '.', '_' and '-', or null")
    need(bool(tc.data_dir), f"{trp}.data_dir", tc.data_dir, "a folder")
    need(Path(tc.model_dir).resolve() != Path(tc.tensorboard_dir).resolve(), f"{trp}.tensorboard_dir",
         tc.tensorboard_dir, f"another folder than trainer_config.model_dir ({tc.model_dir!r}): a run has a folder in each")


def flat_settings(tree: dict, prefix: str = "") -> dict[str, float | str | bool]:
    """A nested config as {"a.b.c": value}, in the types TensorBoard's HParams view takes."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def changed_settings(before: Config, after: Config) -> dict[str, tuple]:
    """Each flat key ("a.b.c") whose value differs between two configs: (before's, after's)."""
    old, new = flat_settings(dataclasses.asdict(before)), flat_settings(dataclasses.asdict(after))
    return {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}


def apply_override(raw: dict, assignment: str) -> None:
    """Set raw['a']['b'] from 'a.b=value', the value parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML") from None


def parse_yaml(path: str | Path, what: str = "config"):
    """What a YAML file holds; a missing or malformed file is a ConfigError naming it as `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}; give an existing YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing, empty or malformed file is a ConfigError."""
    raw = parse_yaml(path)
    if raw is None:
        raise ConfigError(f"{path} is empty; a config names model_config and trainer_config "
                          f"(see {DEFAULT_CONFIG.name})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model_config, trainer_config)")
    return raw


def apply_overrides(raw: dict, overrides: list[str], source: str, overrides_from: str = "--set") -> Origins:
    """Apply `--set` assignments to raw; the Origins that say which values they set (and that
    they came from `overrides_from`)."""
    for assignment in overrides:
        apply_override(raw, assignment)
    return Origins(source, {a.partition("=")[0] for a in overrides}, overrides_from)


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] = (), overrides_from: str = "--set") -> Config:
    """The checked config of a YAML file with `--set section.key=value` overrides."""
    raw = read_yaml(path)
    return config_from_dict(raw, apply_overrides(raw, overrides, str(path), overrides_from))


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
                                                  for name, values in metadata.user_features.items()})


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
