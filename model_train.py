"""Train the MovieLens Transformer: python model_train.py [--config PATH] [--set a.b=value ...]

Reads the YAML config, downloads MovieLens when data_dir lacks it, trains with cross-entropy and
Adam, and after every epoch logs training and validation loss (validation targets, never the
training set), every `eval_every` epochs validation HR/NDCG/MRR@10 with everything the user saw
excluded, to loguru, tqdm and TensorBoard. Checkpoints best.pt (by validation NDCG@10) and last.pt
land atomically in model_dir/<run>; training stops early after `patience` evaluations without a
better NDCG@10. `--resume models/<run>` continues a run at its next epoch.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import yaml
from loguru import logger
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoint import check_same_data, load_checkpoint, resume_config, save_atomic
from build import build_model, make_datasets
from config import DEFAULT_CONFIG, Config, TrainerConfig, flat_settings, load_config
from data import DatasetMetadata, MovieLensData
from distributed import Group, exit_process, gather, on_main, start, stop, sum_over_processes, wait_for_all
from errors import Interrupted, UserError, argument_parser, run_script
from files import atomic_write, take_lock, write_error
from plots import plot_training_curves
from ranking import Scorer, metrics_from_ranks, model_scorer, rank_all
from speed import Step, speed_settings
from training import make_loss, make_optimizer, make_schedule, make_training_step, resume_optimizer, seed_epoch


def train_epoch(step_fn: Step, dataset, tc: TrainerConfig, generator: torch.Generator,
                writer: Optional[SummaryWriter], epoch: int, first_step: int, group: Group) -> tuple[float, float]:
    """One pass over the shuffled training data (this process's share of it): (mean loss per
    target, targets per second), over all processes."""
    total = torch.zeros((), device=dataset.device)
    targets = torch.zeros((), dtype=torch.long, device=dataset.device)
    diverged_at = torch.full((), -1, dtype=torch.long, device=dataset.device)  # the first non-finite loss's step
    start = time.perf_counter()
    quiet = {} if group.is_main else {"disable": True}  # unset, tqdm reads TQDM_DISABLE and its other variables
    bar = tqdm(dataset.batches(tc.batch_size, shuffle=True, generator=generator, rank=group.rank, world=group.world),
               total=dataset.num_batches(tc.batch_size, group.world), desc=f"epoch {epoch}", leave=False, **quiet)
    for step, batch in enumerate(bar, first_step + 1):
        loss, count = step_fn(batch)
        total += loss * count
        targets += count
        diverged_at = torch.where((diverged_at < 0) & ~torch.isfinite(loss), step, diverged_at)
        if step % tc.log_every == 0:  # the only host syncs inside the epoch
            if not group.is_distributed and int(diverged_at) >= 0:  # several processes stop together, below
                raise diverged(epoch, int(diverged_at), tc)
            if writer:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                writer.add_scalar("loss/train_step", loss.item(), step)
    total, n = sum_over_processes(group, total, targets)
    if not math.isfinite(total):  # summed over the processes: a loss that diverged on any of them
        raise diverged(epoch, int(diverged_at), tc)
    return total / max(n, 1), n / (time.perf_counter() - start)


def diverged(epoch: int, step: int, tc: TrainerConfig) -> UserError:
    """The error of a run whose loss is no longer finite, raised before anything of its epoch is saved;
    step < 0: the loss diverged on another process."""
    where = f", first at step {step}" if step >= 0 else ""
    clip = "lower trainer_config.grad_clip" if tc.grad_clip else "set trainer_config.grad_clip (e.g. 1.0)"
    return UserError(f"training diverged in epoch {epoch}: the loss is not finite{where}; lower "
                     f"trainer_config.learning_rate ({tc.learning_rate:g}) or {clip}")


@torch.inference_mode()
def validate(scorer: Scorer, shard, tc: TrainerConfig, compiled: bool, group: Group,
             with_metrics: bool) -> dict[str, float]:
    """Validation loss, and with_metrics HR/NDCG/MRR@10, of every process's shard together."""
    total = torch.zeros((), device=shard.device)
    for batch in shard.batches(tc.eval_batch_size):
        total += F.cross_entropy(scorer(batch), batch.target_tokens, reduction="sum")
    total, n = sum_over_processes(group, total, len(shard))
    result = {"loss/validation": total / max(n, 1)}
    if with_metrics:
        ranks, _ = rank_all(scorer, shard, batch_size=tc.eval_batch_size, compiled=compiled)
        metrics = metrics_from_ranks(gather(group, ranks), ks=(10,))
        result.update({f"metrics/validation/{k}": metrics[k] for k in ("hr@10", "ndcg@10", "mrr@10")})
    return result


def open_run(tc: TrainerConfig, resume: Optional[Path]) -> tuple[Path, Path]:
    """The run's model folder and TensorBoard folder. A new run creates both and refuses names
    already taken; a resumed run drops the temporaries a crash may have left."""
    if resume:
        for stale in resume.glob(".*.tmp"):
            stale.unlink()
        return resume, Path(tc.tensorboard_dir) / resume.name
    run, log_dir = Path(tc.model_dir) / tc.run_name, Path(tc.tensorboard_dir) / tc.run_name
    if run.is_dir() and {p.name for p in run.iterdir() if not p.name.endswith(".tmp")} <= {"config.yaml", "best.pt"}:
        logger.warning(f"{run} holds a run that was killed before it saved an epoch: starting it afresh")
        remove_folders(run, log_dir)
    for folder, key in ((run, "model_dir"), (log_dir, "tensorboard_dir")):
        if folder.exists():
            raise UserError(f"{folder} already exists (trainer_config.{key} / run_name); choose another "
                            f"trainer_config.run_name, or continue that run with --resume {run}")
    for folder in (run, log_dir):
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            remove_folders(run, log_dir)
            raise write_error(folder, e, "choose writable trainer_config.model_dir and tensorboard_dir") from None
    return run, log_dir


def lock_run(tc: TrainerConfig, resume: Optional[Path]) -> Callable[[], None]:
    """Hold the run's lock file (beside its folder) while it trains, so that no second process
    starts, resumes or removes a run a live one trains; returns its release. A new run without a
    run_name is named here, by the time."""
    if not resume:
        tc.run_name = tc.run_name or time.strftime("%Y%m%d-%H%M%S")
    run = resume or Path(tc.model_dir) / tc.run_name
    try:
        run.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(run.parent, e, "choose a writable trainer_config.model_dir") from None
    return take_lock(run.parent / f".{run.name}.lock", f"the run {run}")


def train(config: Config, resume: Optional[Path] = None, data: Optional[MovieLensData] = None) -> Path:
    """Train as configured (or continue the run in `resume`); returns the run folder. Under
    torchrun, every process runs this (distributed.py); rank 0 holds the run's lock."""
    tc = config.trainer_config
    group, device = start(tc.device)
    releases: list[Callable[[], None]] = []
    try:
        on_main(group, lambda: releases.append(lock_run(tc, resume)))
        run = train_on(config, group, device, resume, data)
        wait_for_all(group)
        return run
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU, a RuntimeError from the CPU's allocator
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
            size = re.search(r"allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", str(e), re.IGNORECASE)
            asked = f" (it asked for {size.group(1)} more)" if size else ""
            raise UserError(f"out of memory on {device}{asked}; lower trainer_config.batch_size ({tc.batch_size}) "
                            f"or eval_batch_size ({tc.eval_batch_size}), or the model's sizes") from None
        raise
    except OSError as e:  # a write the checkpoints' own checks do not see: TensorBoard's event files, curves.png
        raise write_error(Path(e.filename or Path(tc.tensorboard_dir) / str(tc.run_name)), e) from None
    finally:
        for release in releases:
            release()
        stop(group)


def train_on(config: Config, group: Group, device: torch.device, resume: Optional[Path],
             data: Optional[MovieLensData]) -> Path:
    """One process's part of the run: all of it without torchrun."""
    tc = config.trainer_config
    torch.manual_seed(tc.seed)  # the weights' initialisation; rank 0's reach every process
    if not group.is_main:
        logger.remove()  # rank 0 alone logs
    datasets = make_datasets(config, data)
    metadata = datasets["train"].metadata
    train_set = datasets["train"].to(device)
    val_shard = datasets["validation"].to(device).shard(group.rank, group.world)
    speed = speed_settings(tc, device, train_set.batch_shapes, group.is_distributed)
    model = build_model(config, metadata).to(device)
    optimizer = make_optimizer(model, tc, device, capturable=speed.cuda_graph)
    schedule = make_schedule(optimizer, tc, train_set.num_batches(tc.batch_size, group.world))
    step_fn = make_training_step(model, make_loss(tc, train_set), optimizer, schedule, tc, speed, device,
                                 group.is_distributed)
    scorer = model_scorer(model, compiled=speed.compile)
    generator = torch.Generator().manual_seed(tc.seed)
    state = {"epoch": 0, "best_ndcg": -1.0, "stale": 0}
    if resume:
        checkpoint = load_checkpoint(resume / "last.pt")
        check_same_data(DatasetMetadata.from_dict(checkpoint["metadata"]), metadata, str(resume / "last.pt"),
                        tc.data_dir)
        model.load_state_dict(checkpoint["model"])
        resume_optimizer(optimizer, schedule, checkpoint, tc)
        generator.set_state(checkpoint["generator"])
        state = checkpoint["state"]
        if done := finished(state, tc):
            logger.info(f"{resume} {done}: nothing to train")
            return resume
    run, log_dir = on_main(group, lambda: open_run(tc, resume))
    tc.run_name = run.name
    writer = None
    try:
        if group.is_main:
            atomic_write(run / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(asdict(config), sort_keys=False)))
            writer = SummaryWriter(str(log_dir))
        logger.info(f"run {tc.run_name} on {device} x {group.world} ({speed}): {len(train_set):,} training targets, "
                    f"{len(datasets['validation']):,} validation targets, "
                    f"{sum(p.numel() for p in model.parameters()):,} parameters")
        if speed.compile:
            logger.info(COMPILING)
        first_epoch = state["epoch"] + 1
        for epoch in range(first_epoch, tc.num_epochs + 1):
            started = time.perf_counter()
            model.train()
            seed_epoch(tc.seed, epoch, group.rank)
            train_loss, samples_per_s = train_epoch(step_fn, train_set, tc, generator, writer, epoch,
                                                    schedule.last_epoch, group)
            model.eval()
            evaluated = epoch % tc.eval_every == 0 or epoch == tc.num_epochs
            scalars = {"loss/train": train_loss, **validate(scorer, val_shard, tc, speed.compile, group, evaluated),
                       "lr": float(optimizer.param_groups[0]["lr"]), "throughput/samples_per_s": samples_per_s,
                       "time/epoch_s": time.perf_counter() - started}
            if device.type == "cuda":
                scalars["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            improved = evaluated and scalars["metrics/validation/ndcg@10"] > state["best_ndcg"]
            if evaluated:
                state["best_ndcg"] = max(state["best_ndcg"], scalars["metrics/validation/ndcg@10"])
                state["stale"] = 0 if improved else state["stale"] + 1
            logger.info(f"epoch {epoch}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()))
            if epoch == first_epoch + speed.compile and epoch < tc.num_epochs:  # compiled: the first after compiling
                logger.info(pace(scalars["time/epoch_s"], tc.num_epochs - epoch, tc))
            state["epoch"] = epoch
            if group.is_main:
                for key, value in scalars.items():
                    writer.add_scalar(key, value, epoch)
                writer.flush()
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "schedule": schedule.state_dict(), "state": dict(state), "config": asdict(config),
                              "metadata": metadata.to_dict(), "generator": generator.get_state()}
                if improved:  # best.pt first: a crash between the two writes only repeats this epoch
                    save_atomic(checkpoint, run / "best.pt")
                save_atomic(checkpoint, run / "last.pt")
            if tc.patience is not None and state["stale"] >= tc.patience:
                logger.info(f"no better validation NDCG@10 for {tc.patience} evaluations: stopping")
                break
        if group.is_main:  # TensorBoard's HParams view: this run's settings beside its result
            writer.add_hparams(flat_settings(asdict(config)), {"hparam/best_validation_ndcg@10": state["best_ndcg"]},
                               run_name=".")
    except KeyboardInterrupt:
        kept = remove_if_unsaved(run, log_dir, state["epoch"]) if group.is_main else ""
        raise Interrupted(f"the run stopped during epoch {state['epoch'] + 1}, whose progress is discarded; "
                          f"{kept}") from None
    except BaseException:
        if group.is_main:
            remove_if_unsaved(run, log_dir, state["epoch"])
        raise
    finally:
        if writer:
            writer.close()
    if group.is_main:
        plot_training_curves(log_dir, run / "curves.png")
    logger.info(f"best validation NDCG@10 {state['best_ndcg']:.4f}; checkpoints in {run}")
    return run


COMPILING = ("torch.compile builds the training step and validation in their first steps, once per run: "
             "one to three minutes on a 2-core CPU with an empty cache, less once it is cached")


def pace(epoch_s: float, left: int, tc: TrainerConfig) -> str:
    """How long the rest of the run takes at most, at this epoch's pace."""
    bound = f"{epoch_s * left / 3600:.1f} h" if epoch_s * left >= 3600 else f"{epoch_s * left / 60:.0f} min"
    stop = (f"; early stopping (patience {tc.patience} evaluations) usually ends it sooner"
            if tc.patience is not None else "")
    epochs = f"{left} epoch{'s' * (left != 1)}"
    return (f"{epoch_s:.0f} s an epoch: the {epochs} left (trainer_config.num_epochs {tc.num_epochs}) take at most "
            f"{bound} at this pace{stop}")


def finished(state: dict, tc: TrainerConfig) -> str:
    """Why a run has nothing left to train ("" while it has)."""
    if state["epoch"] >= tc.num_epochs:
        return f"trained all {tc.num_epochs} epochs of trainer_config.num_epochs; raise it (--set) to train on"
    if tc.patience is not None and state["stale"] >= tc.patience:
        return (f"stopped early after epoch {state['epoch']} (no better validation NDCG@10 for {tc.patience} "
                f"evaluations); raise trainer_config.patience, or set it to null, to train on")
    return ""


def remove_folders(*folders: Path) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def remove_if_unsaved(run: Path, log_dir: Path, epoch: int) -> str:
    """Remove the folders of a run that stopped before it saved an epoch; say what was kept."""
    if (run / "last.pt").exists():
        return f"epoch {epoch} is saved; python model_train.py --resume {run} continues with epoch {epoch + 1}"
    remove_folders(run, log_dir)
    return f"no epoch was saved, so {run} and {log_dir} are removed"


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", type=Path, help="run folder whose last.pt to continue")
    args = parser.parse_args(argv)
    if args.resume and args.config:
        raise UserError(f"--resume continues {args.resume} with the config saved in it; --config cannot change it "
                        "(use --set for the settings a resumed run may change)")
    if not args.resume:
        return train(load_config(args.config or DEFAULT_CONFIG, args.overrides))
    last = args.resume / "last.pt"
    config, changes = resume_config(load_checkpoint(last), args.overrides, str(last))
    for change in changes:
        logger.info(f"resuming {args.resume} with {change}")
    return train(config, resume=args.resume)


if __name__ == "__main__":
    exit_process(run_script(main))
