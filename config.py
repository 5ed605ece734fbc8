"""The training config: YAML, strict, every value checked when it loads.

A config file has two sections, `model_config` (movielens_transformer's dataclasses) and
`trainer_config` (TrainerConfig below); `--set section.key=value` overrides one value. Each key is
declared once, beside its field (keys.key): default, rule, and whether a resumed run may change it
or it defines the run. An unknown or mistyped key is an error that names it, and so is a key this
repo has renamed. What a config builds (device, data sets, model) is in build.py.
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
import yaml

from data import SPLITS
from errors import ConfigError
from keys import Declared, at_least, declaration, finite, key, matches, one_of, or_null, positive, probability, rule
from movielens_transformer import MovieLensTransformerConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "training_config.yaml"


@dataclass
class TrainerConfig:
    data_dir: str = key("data/ml-1m", rule(bool, "a folder"), resume=True, run=False)
    cache: bool = key(True, resume=True, run=False)  # keep the tokenized data beside the raw files
    split: str = key("leave_one_out", one_of(SPLITS))  # or random_windows: the post's leaky split
    window_stride: int = key(1, at_least(1))  # positions between the targets of consecutive training windows
    batch_size: int = key(512, at_least(1))
    eval_batch_size: int = key(1024, at_least(1), resume=True, run=False)
    learning_rate: float = key(1e-3, finite & positive, resume=True)
    optimizer: str = key("adam", one_of(("adam", "adamw")))  # adamw: decoupled weight decay
    weight_decay: float = key(0.0, finite & at_least(0), resume=True)
    lr_schedule: str = key("constant", one_of(("constant", "cosine")), resume=True)  # cosine: to min_lr_ratio x lr
    warmup_steps: int = key(0, at_least(0), resume=True)  # linear warm-up from 0
    min_lr_ratio: float = key(0.1, finite & rule(lambda v: 0 <= v <= 1, "in [0, 1]"), resume=True)
    grad_clip: Optional[float] = key(None, finite & or_null(positive), resume=True)  # max global gradient norm
    label_smoothing: float = key(0.0, finite & probability, resume=True)
    # a loss weight per star, 1 to 5 (half stars: the next); null: 1
    rating_weights: Optional[list[float]] = key(None, rule(
        lambda v: v is None or len(v) == 5 and all(math.isfinite(w) and w >= 0 for w in v) and sum(v) > 0,
        "null or five weights for 1 to 5 stars, at least 0, not all 0"))
    loss: str = key("full", one_of(("full", "sampled")))  # full: softmax over all movies; sampled: over negatives
    # full loss in chunks of this many rows (bounds its memory)
    loss_chunk_rows: Optional[int] = key(None, or_null(at_least(1)), resume=True, run=False)
    negatives: str = key("uniform", one_of(("uniform", "in_batch")))  # in_batch: logQ-corrected
    num_negatives: int = key(1024, at_least(1))  # uniform negatives shared by a batch
    num_epochs: int = key(1000, at_least(1), resume=True)  # upper bound; early stopping usually ends sooner
    patience: Optional[int] = key(5, or_null(at_least(1)), resume=True)  # evaluations without a better NDCG@10
    eval_every: int = key(1, at_least(1), resume=True)  # epochs between validations (loss, HR/NDCG/MRR@10)
    log_every: int = key(100, at_least(1), resume=True, run=False)  # steps between training-loss log points
    device: str = key("auto", matches(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:N"),
                      resume=True, run=False)
    # speed (speed.speed_settings decides each null from the device and the batches)
    compile: Optional[bool] = key(None, resume=True, run=False)  # torch.compile the training loss and validation
    bf16: Optional[bool] = key(None, resume=True)  # bf16 autocast in the training loss
    cuda_graph: Optional[bool] = key(None, resume=True, run=False)  # the whole training step as one CUDA graph
    pack_chunks: bool = key(True, resume=True)  # sequence mode: a batch's short chunks share rows, not padding
    seed: int = key(42, at_least(0) & rule(lambda v: v < 2**32, "below 2**32 (4294967296)"))
    tensorboard_dir: str = key("runs", run=False)
    model_dir: str = key("models", run=False)
    run_name: Optional[str] = key(None, or_null(matches(r"(?!\.\.?$)[\w.-]+", "letters, digits, '.', '_' and '-'")))


@dataclass
class Config:
    model_config: MovieLensTransformerConfig = field(default_factory=MovieLensTransformerConfig)
    trainer_config: TrainerConfig = field(default_factory=TrainerConfig)


# keys of earlier versions: a config naming one is an error that names what replaced it
RENAMED = {"trainer_config.window_size": "trainer_config.window_stride"}
REMOVED = {"trainer_config.compile_mode": "the captured CUDA-graph step (trainer_config.cuda_graph) "
                                          "replaced torch.compile's modes"}


def declared_keys(cls: type = Config, prefix: str = "") -> dict[str, Declared]:
    """Every key of a config dataclass, flat ("a.b.c"), with its declaration (keys.key)."""
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(declared_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = declaration(f)
    return out


class Origins:
    """Where each config value came from, for error messages: a file, or --set."""

    def __init__(self, source: str, overridden: set[str] = frozenset(), overrides_from: str = "--set",
                 old_key_remedy: str = ""):
        self.source, self.overridden, self.overrides_from = source, overridden, overrides_from
        self.old_key_remedy = old_key_remedy  # what to do about a key of an earlier version, if not to change it

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
    for part, value in raw.items():
        name = f"{prefix}{part}"
        if name in RENAMED:
            raise ConfigError(f"{name} is now called {RENAMED[name]} (from {origins(name)}); "
                              f"{origins.old_key_remedy or 'rename it'}")
        if name in REMOVED:
            raise ConfigError(f"{name} is no longer a setting (from {origins(name)}): {REMOVED[name]}; "
                              f"{origins.old_key_remedy or 'remove it'}")
        if part not in fields:
            close = difflib.get_close_matches(str(part), fields, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {name} (from {origins(name)}); {hint}")
        if dataclasses.is_dataclass(fields[part]) and value is not None:
            check_keys(value, fields[part], origins, f"{name}.")


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
    """Every value by its key's rule (keys.key, beside the field), then the rules that join keys:
    a bad value fails at once rather than after the data has loaded or an epoch has run."""
    values = flat_settings(dataclasses.asdict(config), plain=False)
    for name, declared in declared_keys().items():
        broken = declared.rule and declared.rule.broken_by(values[name])
        if broken:
            raise ConfigError(f"{name} is {values[name]!r} (from {origins(name)}); it must be {broken}")
    check_combinations(config, origins)


def check_combinations(config: Config, origins: Origins) -> None:
    """The rules that join several keys; each error names the key that breaks it."""
    mc, tc = config.model_config, config.trainer_config
    t = mc.transformer_config

    def need(ok: bool, key: str, value: object, requirement: str) -> None:
        if not ok:
            raise ConfigError(f"{key} is {value!r} (from {origins(key)}); it must be {requirement}")

    need(t.embedding_dimension % t.num_heads == 0, "model_config.transformer_config.num_heads", t.num_heads,
         f"a divisor of embedding_dimension ({t.embedding_dimension})")
    if mc.tie_output_embeddings:
        last = mc.interaction_mlp_hidden_sizes[-1] if mc.interaction_mlp_hidden_sizes else None
        need(last == t.embedding_dimension, "model_config.interaction_mlp_hidden_sizes", mc.interaction_mlp_hidden_sizes,
             f"a list ending in embedding_dimension ({t.embedding_dimension}) when tie_output_embeddings is true")
    need(not mc.query_time or mc.time_bias, "model_config.query_time", mc.query_time,
         "false unless model_config.time_bias is true (query time is the time bias's query)")
    need(not mc.user_features or mc.user_embedding_dimension >= 1, "model_config.user_features", mc.user_features,
         "[] when user_embedding_dimension is 0 (the features join the user embedding)")
    need(mc.text_output == "none" or "text" in mc.movie_features, "model_config.text_output", mc.text_output,
         "none unless model_config.movie_features has text")
    need(mc.mode != "sequence" or tc.split == "leave_one_out", "trainer_config.split", tc.split,
         "leave_one_out in the sequence mode")
    need(tc.loss == "full" or tc.label_smoothing == 0, "trainer_config.label_smoothing", tc.label_smoothing,
         "0 with the sampled loss")
    need(Path(tc.model_dir).resolve() != Path(tc.tensorboard_dir).resolve(), "trainer_config.tensorboard_dir",
         tc.tensorboard_dir, f"another folder than trainer_config.model_dir ({tc.model_dir!r}): a run has a folder in each")


def flat_settings(tree: dict, prefix: str = "", plain: bool = True) -> dict[str, object]:
    """A nested config as {"a.b.c": value}; plain: in the types TensorBoard's HParams view takes."""
    flat = {}
    for part, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{part}.", plain))
        else:
            keep = not plain or isinstance(value, (int, float, str, bool))
            flat[f"{prefix}{part}"] = value if keep else str(value)
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
    shown = assignment if len(assignment) <= 60 else assignment[:57] + "..."
    node[leaf] = load_yaml(value, f"--set {shown!r}")


MAX_YAML_CHARS, MAX_YAML_NODES, MAX_YAML_DEPTH = 100_000, 100_000, 32  # a config is a few hundred of each


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (the last would win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key_node.value!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str):
    """What YAML text holds, read with limits: an alias bomb, deep nesting or a huge file is a
    ConfigError in well under a second instead of a MemoryError or RecursionError later; a key
    given twice is refused (StrictLoader)."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{where}: {len(text):,} characters; a config is far shorter (at most {MAX_YAML_CHARS:,})")
    loader = StrictLoader(text)
    try:
        check_depth(text, where)
        node = loader.get_single_node()
        if node is not None:
            measure_yaml(node, {}, where)
        return None if node is None else loader.construct_document(node)
    except RecursionError:  # indentation nested hundreds deep, which check_depth does not count
        raise ConfigError(f"{where}: nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()


QUOTED_OR_COMMENT = re.compile(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"|#[^\n]*")


def check_depth(text: str, where: str) -> None:
    """A ConfigError for brackets nested deeper than MAX_YAML_DEPTH (outside quotes and comments),
    counted in one pass before PyYAML's scanner (quadratic in that depth) and its recursive
    composer (which would reach Python's recursion limit) see them."""
    depth = 0
    for char in QUOTED_OR_COMMENT.sub("", text):
        depth += char in "[{"
        depth -= char in "]}"
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested too deeply (at most {MAX_YAML_DEPTH} levels)")


def measure_yaml(node: yaml.Node, sizes: dict, where: str) -> tuple[int, int]:
    """(nodes with every alias expanded, depth) of a composed YAML node; a ConfigError past the
    limits. Each node is measured once (an alias bomb's shared nodes cost nothing to count)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = (0, MAX_YAML_DEPTH + 1)  # met again inside itself: a recursive alias
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                node.value if isinstance(node, yaml.SequenceNode) else [])
    size, depth = 1, 0
    for child in children:
        child_size, child_depth = measure_yaml(child, sizes, where)
        size, depth = size + child_size, max(depth, child_depth + 1)
        if size > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: " + (f"nested too deeply (at most {MAX_YAML_DEPTH} levels)"
                                              if depth > MAX_YAML_DEPTH else
                                              f"more than {MAX_YAML_NODES:,} values once its aliases are expanded"))
    sizes[id(node)] = (size, depth)
    return size, depth


def parse_yaml(path: str | Path, what: str = "config"):
    """What a YAML file holds (load_yaml); a missing or malformed file is a ConfigError naming it as `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_CHARS + 1)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the {what} {path}: {reason}; give an existing YAML file") from None
    return load_yaml(text, str(path))


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing, empty or malformed file is a ConfigError."""
    raw = parse_yaml(path)
    if raw is None:
        raise ConfigError(f"{path} is empty; a config names model_config and trainer_config "
                          f"(see {DEFAULT_CONFIG.name})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model_config, trainer_config)")
    return raw


def apply_overrides(raw: dict, overrides: list[str], source: str, overrides_from: str = "--set",
                    old_key_remedy: str = "") -> Origins:
    """Apply `--set` assignments to raw; the Origins that say which values they set (and that
    they came from `overrides_from`)."""
    for assignment in overrides:
        apply_override(raw, assignment)
    return Origins(source, {a.partition("=")[0] for a in overrides}, overrides_from, old_key_remedy)


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] = (), overrides_from: str = "--set") -> Config:
    """The checked config of a YAML file with `--set section.key=value` overrides."""
    raw = read_yaml(path)
    return config_from_dict(raw, apply_overrides(raw, overrides, str(path), overrides_from))
