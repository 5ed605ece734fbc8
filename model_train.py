"""Train the MovieLens Transformer: python model_train.py [--config PATH] [--set a.b=value ...]

Reads the YAML config, downloads MovieLens when data_dir lacks it, trains with cross-entropy and
Adam, and logs the training loss after every epoch and, every `eval_every` epochs (and after
the last), the validation loss and HR/NDCG/MRR@10 (validation targets, never the training set;
everything the user saw excluded from the ranking, one pass of the model for all of them), to
loguru, tqdm and TensorBoard. Checkpoints best.pt (by validation NDCG@10) and last.pt
land atomically in model_dir/<run>; training stops early after `patience` evaluations without a
better NDCG@10. `--resume models/<run>` continues a run at its next epoch.
"""
from __future__ import annotations

import errors  # before the libraries: Ctrl-C while they load is one line
errors.quiet_while_loading()

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from beyond_accuracy import coverage
from build import build_model, make_datasets
from checkpoint import check_same_data, load_checkpoint, load_weights, resume_config
from config import DEFAULT_CONFIG, Config, TrainerConfig, flat_settings, load_config
from data import DatasetMetadata, MovieLensData, MovieLensSequenceDataset
from distributed import Group, exit_process, gather, on_main, start, stop, sum_over_processes, wait_for_all
from errors import Interrupted, UserError, argument_parser, out_of_memory, run_script
from files import write_error
from ranking import Scorer, metrics_from_ranks, model_scorer, rank_all
from run import (EPOCH_SECONDS, LEARNING_RATE, PEAK_GPU_MB, STEP_LOSS, THROUGHPUT, TRAIN_LOSS, VALIDATION_LOSS,
                 VALIDATION_NDCG, VALIDATION_SECONDS, Run, finished, last_checkpoint, run_folder_of, validation_tag)
from speed import Speed, Step, speed_settings
from training import make_loss, make_optimizer, make_schedule, make_training_step, resume_optimizer, seed_epoch

if TYPE_CHECKING:  # imported when a run opens its writer: a failing command need not load TensorBoard
    from torch.utils.tensorboard import SummaryWriter


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
                writer.add_scalar(STEP_LOSS, loss.item(), step)
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
def validate(scorer: Scorer, shard, tc: TrainerConfig, compiled: bool, group: Group) -> dict[str, float]:
    """Validation loss, HR/NDCG/MRR@10 and the top-10 lists' catalog coverage, of every
    process's shard together: one pass of the model, the loss summed from the scores it ranks."""
    total = torch.zeros((), device=shard.device)

    def scored_and_summed(batch) -> torch.Tensor:
        nonlocal total
        scores = scorer(batch)
        total += F.cross_entropy(scores, batch.target_tokens, reduction="sum")
        return scores
    ranks, lists = rank_all(scored_and_summed, shard, batch_size=tc.eval_batch_size, top=10, compiled=compiled)
    total, n = sum_over_processes(group, total, len(shard))
    metrics = metrics_from_ranks(gather(group, ranks), ks=(10,))
    metrics["coverage@10"] = coverage(gather(group, lists), shard.metadata.num_movies)
    return {VALIDATION_LOSS: total / max(n, 1),
            **{validation_tag(k): metrics[k] for k in ("hr@10", "ndcg@10", "mrr@10", "coverage@10")}}


def train(config: Config, resume: Optional[Path] = None, data: Optional[MovieLensData] = None) -> Path:
    """Train as configured (or continue the run in `resume`); returns the run folder. Under
    torchrun, every process runs this (distributed.py); rank 0 holds the run's lock."""
    tc = config.trainer_config
    group, device = start(tc.device)
    releases: list[Callable[[], None]] = []
    try:
        run = on_main(group, lambda: Run.for_training(tc, resume))
        tc.run_name = run.name
        on_main(group, lambda: releases.append(run.lock()))
        train_on(config, group, device, run, resume is not None, data)
        wait_for_all(group)
        return run.folder
    except (RuntimeError, MemoryError) as e:
        raise out_of_memory(e, device, f"lower trainer_config.batch_size ({tc.batch_size}) or eval_batch_size "
                                       f"({tc.eval_batch_size}), or the model's sizes") or e from None
    except OSError as e:  # a write the checkpoints' own checks do not see: TensorBoard's event files
        raise write_error(Path(e.filename or Path(tc.tensorboard_dir) / str(tc.run_name)), e) from None
    finally:
        for release in releases:
            release()
        stop(group)


class Trainer(NamedTuple):
    """What one process trains with, built from the config."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    step: Step                # one training step, at the speed settings
    scorer: Scorer            # validation's scores
    speed: Speed
    train_set: object         # data.MovieLensSequenceDataset or data.HistoryChunks
    validation: MovieLensSequenceDataset  # this process's share of the validation targets
    validation_targets: int                # all processes' together
    metadata: DatasetMetadata
    generator: torch.Generator  # the shuffle's random numbers, saved in every checkpoint


def build_trainer(config: Config, group: Group, device: torch.device, data: Optional[MovieLensData]) -> Trainer:
    """Data sets, speed settings, model, optimizer, schedule and training step for this process."""
    tc = config.trainer_config
    torch.manual_seed(tc.seed)  # the weights' initialisation; rank 0's reach every process
    datasets = make_datasets(config, data)
    train_set = datasets["train"].to(device)
    validation = datasets["validation"].to(device).shard(group.rank, group.world)
    speed = speed_settings(tc, device, train_set.batch_shapes, group.is_distributed)
    model = build_model(config, train_set.metadata).to(device)
    optimizer = make_optimizer(model, tc, device, capturable=speed.cuda_graph)
    schedule = make_schedule(optimizer, tc, train_set.num_batches(tc.batch_size, group.world))
    step = make_training_step(model, make_loss(tc, train_set), optimizer, schedule, tc, speed, device,
                              group.is_distributed)
    return Trainer(model, optimizer, schedule, step, model_scorer(model, compiled=speed.compile), speed, train_set,
                   validation, len(datasets["validation"]), train_set.metadata, torch.Generator().manual_seed(tc.seed))


def resume_from(trainer: Trainer, run: Run, tc: TrainerConfig) -> dict:
    """Load the run's last checkpoint into the trainer; its state (epoch, best NDCG@10, stale evaluations)."""
    checkpoint = load_checkpoint(run.last)
    check_same_data(DatasetMetadata.from_dict(checkpoint["metadata"]), trainer.metadata, str(run.last), tc.data_dir)
    load_weights(trainer.model, checkpoint["model"], str(run.last))
    resume_optimizer(trainer.optimizer, trainer.schedule, checkpoint, tc)
    trainer.generator.set_state(checkpoint["generator"])
    return checkpoint["state"]


FIRST_STATE = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "stale": 0}  # a run's before its first epoch


def train_on(config: Config, group: Group, device: torch.device, run: Run, resume: bool,
             data: Optional[MovieLensData]) -> None:
    """One process's part of the run (all of it without torchrun): build, resume, open the run,
    train its epochs, write its end."""
    tc = config.trainer_config
    if not group.is_main:
        logger.remove()  # rank 0 alone logs
    trainer = build_trainer(config, group, device, data)
    state = resume_from(trainer, run, tc) if resume else dict(FIRST_STATE)
    if resume and group.is_main:
        run.restore_best()
    if resume and (done := finished(state, tc)):
        logger.info(f"{run.folder} {done}: nothing to train")
        if group.is_main and not run.curves.exists():  # killed after its last checkpoint
            write_end(run, config, state)
        return
    on_main(group, lambda: run.open(resume))
    writer = None
    try:
        if group.is_main:
            writer = run.writer()
            run.write_config(asdict(config))
        logger.info(f"run {run.name} on {device} x {group.world} ({trainer.speed}): "
                    f"{len(trainer.train_set):,} training targets, {trainer.validation_targets:,} validation targets, "
                    f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters")
        train_epochs(trainer, config, group, run, state, writer)
    except KeyboardInterrupt:
        kept = run.remove_if_unsaved(state["epoch"]) if group.is_main else ""
        raise Interrupted(f"the run stopped during epoch {state['epoch'] + 1}, whose progress is discarded; "
                          f"{kept}") from None
    except BaseException:
        if group.is_main:
            run.remove_if_unsaved(state["epoch"])
        raise
    finally:
        if writer:
            writer.close()
    if group.is_main:
        write_end(run, config, state)
    logger.info(f"best validation NDCG@10 {state['best_ndcg']:.4f}; checkpoints in {run.folder}")


def train_epochs(trainer: Trainer, config: Config, group: Group, run: Run, state: dict,
                 writer: Optional[SummaryWriter]) -> None:
    """The epochs left: train, validate, log, checkpoint, until num_epochs or patience ends them.
    state is updated in place, so that an interrupted run knows the last epoch saved."""
    tc = config.trainer_config
    if trainer.speed.compile:
        logger.info(COMPILING)
    first_epoch = state["epoch"] + 1
    for epoch in range(first_epoch, tc.num_epochs + 1):
        started = time.perf_counter()
        trainer.model.train()
        seed_epoch(tc.seed, epoch, group.rank)
        train_loss, samples_per_s = train_epoch(trainer.step, trainer.train_set, tc, trainer.generator, writer, epoch,
                                                trainer.schedule.last_epoch, group)
        trainer.model.eval()
        evaluated = epoch % tc.eval_every == 0 or epoch == tc.num_epochs
        validating = time.perf_counter()
        validation = validate(trainer.scorer, trainer.validation, tc, trainer.speed.compile, group) if evaluated else {}
        scalars = {TRAIN_LOSS: train_loss, **validation,
                   LEARNING_RATE: float(trainer.optimizer.param_groups[0]["lr"]), THROUGHPUT: samples_per_s,
                   EPOCH_SECONDS: time.perf_counter() - started}
        if evaluated:
            scalars[VALIDATION_SECONDS] = time.perf_counter() - validating
        if trainer.train_set.device.type == "cuda":
            scalars[PEAK_GPU_MB] = torch.cuda.max_memory_allocated(trainer.train_set.device) / 2**20
        improved = evaluated and scalars[VALIDATION_NDCG] > state["best_ndcg"]
        if evaluated:
            state["best_ndcg"] = max(state["best_ndcg"], scalars[VALIDATION_NDCG])
            state["stale"] = 0 if improved else state["stale"] + 1
        if improved:
            state["best_epoch"] = epoch
        logger.info(f"epoch {epoch}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in scalars.items()))
        if epoch == first_epoch + trainer.speed.compile and epoch < tc.num_epochs:  # compiled: the first after compiling
            logger.info(pace(scalars[EPOCH_SECONDS], tc.num_epochs - epoch, tc))
        state["epoch"] = epoch
        if writer:
            save_epoch(trainer, config, run, writer, scalars, dict(state), improved)
        if tc.patience is not None and state["stale"] >= tc.patience:
            logger.info(f"no better validation NDCG@10 for {tc.patience} evaluations: stopping")
            break


def save_epoch(trainer: Trainer, config: Config, run: Run, writer: SummaryWriter, scalars: dict[str, float],
               state: dict, improved: bool) -> None:
    """An epoch's scalars to TensorBoard, then its checkpoints."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, state["epoch"])
    writer.flush()
    run.save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
              "schedule": trainer.schedule.state_dict(), "state": state, "config": asdict(config),
              "metadata": trainer.metadata.to_dict(), "generator": trainer.generator.get_state()}, improved)


def write_end(run: Run, config: Config, state: dict) -> None:
    """The run's settings and result in TensorBoard's HParams view, then its curves.png."""
    from plots import plot_training_curves  # here: matplotlib's second of loading only when drawn
    with run.writer() as writer:
        run.write_end(writer, flat_settings(asdict(config)), state["best_ndcg"], plot_training_curves)


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


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--resume", type=Path, help="the run to continue at its last.pt: its folder or a checkpoint in it")
    args = parser.parse_args(argv)
    if args.resume and args.config:
        raise UserError(f"--resume continues {args.resume} with the config saved in it; --config cannot change it "
                        "(use --set for the settings a resumed run may change)")
    if not args.resume:
        return train(load_config(args.config or DEFAULT_CONFIG, args.overrides))
    args.resume = run_folder_of(args.resume)
    last = last_checkpoint(args.resume)
    if not last.exists() and (args.resume / "best.pt").exists():
        raise UserError(f"{args.resume} holds best.pt but no last.pt, which resuming needs: a finished run "
                        f"whose last.pt was removed; evaluate it with python eval.py --checkpoint {args.resume}")
    config, changes = resume_config(load_checkpoint(last), args.overrides, str(last))
    for change in changes:
        logger.info(f"resuming {args.resume} with {change}")
    return train(config, resume=args.resume)


if __name__ == "__main__":
    exit_process(run_script(main))
