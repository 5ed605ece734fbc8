"""Train the MovieLens Transformer: python model_train.py [--config PATH] [--set a.b=value ...]

Reads the YAML config, downloads MovieLens when data_dir lacks it, trains with cross-entropy and
Adam, and after every epoch logs training and validation loss (validation targets, never the
training set), every `eval_every` epochs validation HR/NDCG/MRR@10 with everything the user saw
excluded, to loguru, tqdm and TensorBoard. Checkpoints best.pt (by validation NDCG@10) and last.pt
land atomically in model_dir/<run>; training stops early after `patience` evaluations without a
better NDCG@10.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import dacite
import torch
import torch.nn.functional as F
import yaml
from loguru import logger
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import (ChunkBatch, DatasetMetadata, MovieLensSequenceDataset, SequenceChunks, ensure_movielens,
                  load_movielens)
from eval import Scorer, evaluate, model_scorer
from movielens_transformer import MovieLensTransformer, MovieLensTransformerConfig

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "training_config.yaml"


@dataclass
class TrainerConfig:
    data_dir: str = "data/ml-1m"
    cache: bool = True                   # keep the tokenized data beside the raw files
    split: str = "leave_one_out"         # or random_windows: the post's leaky split
    window_size: int = 1                 # stride between training windows
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
    bf16: Optional[bool] = None          # bf16 autocast; null: on for CUDA, and compiled on a CPU
                                         # with AVX512-BF16 or AMX
    compile: Optional[bool] = None       # torch.compile the training loss and validation; null: on
                                         # in window mode on CUDA and on a CPU with a C++ compiler
    compile_mode: str = "default"        # torch.compile mode: default, reduce-overhead (CUDA graphs), ...
    cuda_graph: Optional[bool] = None    # replay the whole training step as one CUDA graph; null: on
                                         # for CUDA in window mode (sequence batches vary in shape)
                                         # unless compile_mode brings CUDA graphs of its own
    seed: int = 42
    tensorboard_dir: str = "runs"
    model_dir: str = "models"
    run_name: Optional[str] = None       # default: a time stamp


@dataclass
class Config:
    model_config: MovieLensTransformerConfig = field(default_factory=MovieLensTransformerConfig)
    trainer_config: TrainerConfig = field(default_factory=TrainerConfig)


def config_from_dict(raw: dict, source: str) -> Config:
    """Strict dacite conversion: an unknown or mistyped key is an error that names it."""
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
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer_config.device is {name!r} but CUDA is not available")
    return torch.device(name)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside path, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(config: Config, metadata: DatasetMetadata) -> MovieLensTransformer:
    """The model for this data: vocabulary and user count come from the data set."""
    config.model_config.transformer_config.vocab_size = metadata.vocab_size
    config.model_config.num_users = metadata.num_users
    return MovieLensTransformer(config.model_config)


def data_for_checkpoint(config: Config, metadata: DatasetMetadata, data_dir: Optional[str] = None):
    """The tokenized data a checkpoint was trained on (from its config's data_dir, or data_dir)."""
    if data_dir:
        config.trainer_config.data_dir = data_dir
    tc = config.trainer_config
    data = load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    if data.metadata != metadata:
        raise ValueError(f"{tc.data_dir} is not the data set this checkpoint was trained on")
    return data


def model_from_checkpoint(checkpoint: dict) -> tuple[MovieLensTransformer, Config, DatasetMetadata]:
    config = config_from_dict(checkpoint["config"], "checkpoint config")
    metadata = DatasetMetadata.from_dict(checkpoint["metadata"])
    model = build_model(config, metadata)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config, metadata


def make_datasets(config: Config, data=None) -> dict:
    """train, validation and test subsets of the configured split, sharing one parsed data set.

    In the sequence mode, train is SequenceChunks and validation/test windows span the context.
    """
    tc, mc = config.trainer_config, config.model_config
    data = data or load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)
    length = mc.transformer_config.context_window_size
    datasets = {subset: MovieLensSequenceDataset(data, subset, length, tc.window_size, tc.split, tc.seed)
                for subset in ("validation", "test")}
    datasets["train"] = (SequenceChunks(data, length, tc.split) if mc.mode == "sequence" else
                         MovieLensSequenceDataset(data, "train", length, tc.window_size, tc.split, tc.seed))
    return datasets


def make_optimizer(model: torch.nn.Module, tc: TrainerConfig, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW, fused into one kernel per step on CUDA and CPU. capturable: for a CUDA
    graph, with the learning rate a tensor on the device so that the schedule can change it."""
    if tc.optimizer not in ("adam", "adamw"):
        raise ValueError(f"trainer_config.optimizer must be adam or adamw, got {tc.optimizer!r}")
    kind = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    lr = torch.tensor(tc.learning_rate, device=device) if capturable else tc.learning_rate
    return kind(model.parameters(), lr=lr, weight_decay=tc.weight_decay, fused=device.type in ("cuda", "cpu"),
                capturable=capturable)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping a tensor learning rate the same tensor on its device
    (where a CUDA graph reads it) with the saved value."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(rate, torch.Tensor):
            rate.fill_(float(group["lr"]))
            group["lr"] = rate


def uses_cuda_graph(config: Config, device: torch.device) -> bool:
    """Whether to replay the training step as a CUDA graph: it needs CUDA, the window mode's fixed
    batch shapes, and a compile mode without CUDA graphs of its own."""
    tc = config.trainer_config
    possible = (device.type == "cuda" and config.model_config.mode == "window"
                and tc.compile_mode in ("default", "max-autotune-no-cudagraphs"))
    if tc.cuda_graph and not possible:
        raise ValueError("trainer_config.cuda_graph needs a CUDA device, model_config.mode: window and "
                         "a compile_mode without CUDA graphs (default or max-autotune-no-cudagraphs)")
    return possible if tc.cuda_graph is None else tc.cuda_graph


def make_schedule(optimizer, tc: TrainerConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay over num_epochs."""
    if tc.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"trainer_config.lr_schedule must be constant or cosine, got {tc.lr_schedule!r}")
    total = max(tc.num_epochs * steps_per_epoch - tc.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.lr_schedule == "constant":
            return 1.0
        progress = min((step - tc.warmup_steps) / total, 1.0)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # float base rates: a tensor learning rate (capturable optimizer) is then filled in place
    # each step without reading a device tensor back
    schedule.base_lrs = [tc.learning_rate] * len(optimizer.param_groups)
    return schedule


def batch_loss(model, batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(mean cross-entropy, number of targets) of a window Batch or a sequence ChunkBatch."""
    if isinstance(batch, ChunkBatch):
        logits = model.sequence_logits(batch.movie_ids, batch.user_ids, batch.padding_mask, batch.loss_mask)
        targets = batch.targets[batch.loss_mask]
    else:
        logits, targets = model(batch.movie_ids, batch.user_ids), batch.next_movie
    count = batch.loss_mask.sum() if isinstance(batch, ChunkBatch) else len(targets)  # no host copy
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing), count


LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]


def is_full(batch, tc: TrainerConfig) -> bool:
    """A batch of batch_size rows: the one shape that is compiled and captured as a CUDA graph."""
    return len(batch.user_ids) == tc.batch_size


def compiles_by_default(model: torch.nn.Module, device: torch.device) -> bool:
    """torch.compile by default: in window mode (sequence batches vary in shape, and compiled they
    trained at half the eager speed on a CPU), on CUDA, and on a CPU where inductor can build kernels."""
    return model.config.mode == "window" and (device.type == "cuda" or device.type == "cpu" and inductor_builds())


@functools.cache
def inductor_builds() -> bool:
    """Whether torch.compile can build CPU kernels here: it needs a C++ compiler and Python's headers."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
        return True
    except Exception as e:  # a missing compiler or header surfaces as one of several error types
        logger.warning(f"torch.compile cannot build CPU kernels here, training eagerly: {type(e).__name__}: {e}")
        return False


def cpu_has_bf16_arithmetic() -> bool:
    """An x86 CPU with AVX512-BF16 or AMX, as /proc/cpuinfo says (False where there is none)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def compiles(model: torch.nn.Module, tc: TrainerConfig, device: torch.device) -> bool:
    """Whether training's loss and validation are compiled: trainer_config.compile, or its default."""
    return compiles_by_default(model, device) if tc.compile is None else tc.compile


def keep_freed_memory() -> None:
    """Where the C library is glibc, serve allocations under 1 GiB from the heap and keep freed
    memory for reuse. By default glibc gave the evaluation's large buffers (a batch's [1024, 3,885]
    scores: 16 MB) back to the kernel and took them anew: 10,400 page faults a compiled pass over
    ML-1M's 6,040 users, 61 ms against 51 ms without them. Called once at a program's start;
    without glibc it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    for option in (m_trim_threshold, m_mmap_threshold):
        mallopt(option, 1 << 30)


def make_loss_fn(model: torch.nn.Module, tc: TrainerConfig, device: torch.device) -> LossFn:
    """batch_loss under bf16 autocast where configured, and compiled where configured: the model
    and the cross-entropy become one graph, so the softmax over all movies fuses with the loss.
    By default bf16 is on for CUDA, and for a compiled loss on a CPU with bf16 arithmetic."""
    compiled = compiles(model, tc, device)
    bf16 = (device.type == "cuda" or compiled and device.type == "cpu" and cpu_has_bf16_arithmetic()
            if tc.bf16 is None else tc.bf16)

    def loss_fn(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return batch_loss(model, batch, tc.label_smoothing)
    if not compiled:
        return loss_fn
    if device.type == "cpu":
        from torch._inductor import config as inductor_config
        inductor_config.fallback_random = True  # inductor's own CPU random numbers made dropout slower
        # no atomic adds in the embeddings' gradients: with them two runs of one seed differed
        torch.use_deterministic_algorithms(True, warn_only=True)
    compiled_fn = torch.compile(loss_fn, mode=tc.compile_mode)

    def full_batches_compiled(batch):
        # an epoch's last, smaller batch runs eagerly instead of compiling a second graph for it
        return compiled_fn(batch) if is_full(batch, tc) else loss_fn(batch)
    return full_batches_compiled


def backward_and_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: Optional[float]) -> None:
    """Gradients, clipped to grad_clip's global norm where set, then the optimizer step."""
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def train_step(loss_fn: LossFn, optimizer: torch.optim.Optimizer, batch, grad_clip: Optional[float] = None,
               schedule=None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """One optimisation step; returns (loss, targets) without a host sync."""
    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs; otherwise a no-op
    loss, count = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    backward_and_update(loss, optimizer, grad_clip)
    if schedule:
        schedule.step()
    return loss.detach(), count


def capture_step(loss_fn: LossFn, optimizer: torch.optim.Optimizer, example, grad_clip: Optional[float]):
    """The forward, backward and optimizer step captured once as a CUDA graph, and a function that
    replays it on a batch of example's shape: one launch a step instead of hundreds of small
    kernels, each waiting for Python. The optimizer must be capturable and have its state."""
    static = type(example)(*(t.clone() for t in example))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up passes (no update) off the capturing stream
        for _ in range(2):
            loss_fn(static)[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, count = loss_fn(static)
        backward_and_update(loss, optimizer, grad_clip)

    def replay(batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        for buffer, tensor in zip(static, batch):
            buffer.copy_(tensor)
        graph.replay()
        return loss.detach(), count
    return replay


def make_step(loss_fn: LossFn, optimizer: torch.optim.Optimizer, schedule, tc: TrainerConfig,
              graphed: bool) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]:
    """The training step for a batch: train_step, or, when graphed, a CUDA graph of it for every
    full batch (captured at the first full batch once the optimizer has its state)."""
    def eager(batch):
        return train_step(loss_fn, optimizer, batch, tc.grad_clip, schedule)
    if not graphed:
        return eager
    replay = None

    def step(batch):
        nonlocal replay
        if not is_full(batch, tc) or not optimizer.state:
            return eager(batch)
        replay = replay or capture_step(loss_fn, optimizer, batch, tc.grad_clip)
        out = replay(batch)
        if schedule:
            schedule.step()
        return out
    return step


def train_epoch(model, step_fn, schedule, dataset, tc: TrainerConfig, generator: torch.Generator,
                writer: SummaryWriter, epoch: int) -> tuple[float, float]:
    """One pass over the shuffled training data: (mean loss per target, targets per second)."""
    model.train()
    total = torch.zeros((), device=dataset.device)
    targets = torch.zeros((), dtype=torch.long, device=dataset.device)
    start = time.perf_counter()
    bar = tqdm(dataset.batches(tc.batch_size, shuffle=True, generator=generator),
               total=dataset.num_batches(tc.batch_size), desc=f"epoch {epoch}", leave=False)
    for step, batch in enumerate(bar):
        loss, count = step_fn(batch)
        total += loss * count
        targets += count
        if (step + 1) % tc.log_every == 0:  # the only host sync inside the epoch
            value = loss.item()
            bar.set_postfix(loss=f"{value:.4f}")
            writer.add_scalar("loss/train_step", value, schedule.last_epoch)
    n = targets.item()
    return total.item() / max(n, 1), n / (time.perf_counter() - start)


@torch.inference_mode()
def validation_loss(scorer: Scorer, dataset, batch_size: int) -> float:
    total = torch.zeros((), device=dataset.device)
    for batch in dataset.batches(batch_size):
        total += F.cross_entropy(scorer(batch), batch.next_movie, reduction="sum")
    return total.item() / max(len(dataset), 1)


def plot_training_curves(log_dir: Path, path: Optional[Path] = None):
    """Training and validation loss and validation NDCG@10 per epoch, read back with tbparse.

    Saved to path and closed when a path is given, else returned.
    """
    import matplotlib.pyplot as plt
    from tbparse import SummaryReader

    scalars = SummaryReader(str(log_dir)).scalars
    fig, (loss_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for tag, label in (("loss/train", "train"), ("loss/validation", "validation")):
        rows = scalars[scalars.tag == tag]
        loss_ax.plot(rows.step, rows.value, label=label)
    loss_ax.set(title="cross-entropy", xlabel="epoch")
    loss_ax.legend()
    rows = scalars[scalars.tag == "metrics/validation/ndcg@10"]
    ndcg_ax.plot(rows.step, rows.value, marker="o", color="C2")
    ndcg_ax.set(title="validation NDCG@10", xlabel="epoch")
    fig.tight_layout()
    return save_or_return(fig, path)


def save_or_return(fig, path: Optional[Path]):
    """Save a figure to path and close it, or return it for a notebook to show."""
    if path is None:
        return fig
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: Config, resume: Optional[Path] = None, data=None) -> Path:
    """Train as configured (or continue the run in `resume`); returns the run folder."""
    tc = config.trainer_config
    torch.manual_seed(tc.seed)
    device = pick_device(tc.device)
    datasets = make_datasets(config, data)
    metadata = datasets["train"].metadata
    train_set, val_set = datasets["train"].to(device), datasets["validation"].to(device)
    model = build_model(config, metadata).to(device)
    graphed = uses_cuda_graph(config, device)
    optimizer = make_optimizer(model, tc, device, capturable=graphed)
    schedule = make_schedule(optimizer, tc, train_set.num_batches(tc.batch_size))
    step_fn = make_step(make_loss_fn(model, tc, device), optimizer, schedule, tc, graphed)
    compiled = compiles(model, tc, device)
    scorer = model_scorer(model, compiled)
    generator = torch.Generator().manual_seed(tc.seed)
    state = {"epoch": 0, "best_ndcg": -1.0, "stale": 0}
    if resume:
        checkpoint = load_checkpoint(resume / "last.pt")
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["rng"])
        state = checkpoint["state"]
        run = resume
        tc.run_name = run.name
    else:
        tc.run_name = tc.run_name or time.strftime("%Y%m%d-%H%M%S")
        run = Path(tc.model_dir) / tc.run_name
        run.mkdir(parents=True, exist_ok=False)
    (run / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    writer = SummaryWriter(str(Path(tc.tensorboard_dir) / tc.run_name))
    logger.info(f"run {tc.run_name} on {device}: {len(train_set):,} training targets, "
                f"{len(val_set):,} validation targets, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters"
                + (", each full batch's step replayed as one CUDA graph" if graphed else ""))

    for epoch in range(state["epoch"] + 1, tc.num_epochs + 1):
        train_loss, samples_per_s = train_epoch(model, step_fn, schedule, train_set, tc, generator, writer, epoch)
        model.eval()
        val_loss = validation_loss(scorer, val_set, tc.eval_batch_size)
        scalars = {"loss/train": train_loss, "loss/validation": val_loss,
                   "lr": float(optimizer.param_groups[0]["lr"]), "throughput/samples_per_s": samples_per_s}
        improved = False
        if epoch % tc.eval_every == 0 or epoch == tc.num_epochs:
            metrics = evaluate(scorer, val_set, ks=(10,), batch_size=tc.eval_batch_size, compiled=compiled)
            scalars.update({f"metrics/validation/{k}": metrics[k] for k in ("hr@10", "ndcg@10", "mrr@10")})
            improved = metrics["ndcg@10"] > state["best_ndcg"]
            state["best_ndcg"] = max(state["best_ndcg"], metrics["ndcg@10"])
            state["stale"] = 0 if improved else state["stale"] + 1
        for key, value in scalars.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()
        logger.info(f"epoch {epoch}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()))
        state["epoch"] = epoch
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict(),
                      "state": dict(state), "config": asdict(config),
                      "metadata": metadata.to_dict(), "generator": generator.get_state(),
                      "rng": torch.get_rng_state()}
        save_atomic(checkpoint, run / "last.pt")
        if improved:
            save_atomic(checkpoint, run / "best.pt")
        if tc.patience is not None and state["stale"] >= tc.patience:
            logger.info(f"no better validation NDCG@10 for {tc.patience} evaluations: stopping")
            break
    writer.close()
    plot_training_curves(Path(tc.tensorboard_dir) / tc.run_name, run / "curves.png")
    logger.info(f"best validation NDCG@10 {state['best_ndcg']:.4f}; checkpoints in {run}")
    return run


def main(argv: Optional[list[str]] = None) -> Path:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", type=Path, help="run folder whose last.pt to continue")
    args = parser.parse_args(argv)
    if args.resume:
        raw = load_checkpoint(args.resume / "last.pt")["config"]
        for assignment in args.overrides:
            apply_override(raw, assignment)
        config = config_from_dict(raw, f"{args.resume / 'last.pt'}")
    else:
        config = load_config(args.config, args.overrides)
    return train(config, resume=args.resume)


if __name__ == "__main__":
    main()
