"""A training run's folders and everything the scripts know of them, in one place.

A run named <run> has two folders: `model_dir/<run>` holds `config.yaml`, the checkpoints
`best.pt` (by validation NDCG@10) and `last.pt`, `curves.png` and eval.py's `eval_*.json` reports;
`tensorboard_dir/<run>` holds TensorBoard's event files, written under the tags below. The run
lists each file it writes in `.written`, so that restarting a run killed before its first
checkpoint removes those and nothing a user put beside them. While a process trains it, the
run's lock file `model_dir/.<run>.lock` keeps any other from training, resuming or removing it.
A run is finished when its last checkpoint leaves nothing to train (`finished`) and its end
(HParams, curves.png) is written (`complete`).
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import yaml
from loguru import logger

from checkpoint import load_checkpoint, saved_config
from errors import UserError
from files import atomic_write, take_lock, torch_save, write_error

if TYPE_CHECKING:  # pandas (annotations only), TensorBoard and tbparse load where used: eval.py needs none
    import pandas as pd
    from torch.utils.tensorboard import SummaryWriter

# TensorBoard's tags: a scalar per epoch, and the training loss every log_every steps
TRAIN_LOSS, VALIDATION_LOSS, STEP_LOSS = "loss/train", "loss/validation", "loss/train_step"
LEARNING_RATE, THROUGHPUT = "lr", "throughput/samples_per_s"
EPOCH_SECONDS, VALIDATION_SECONDS, PEAK_GPU_MB = "time/epoch_s", "time/validation_s", "memory/peak_gpu_mb"
BEST_NDCG = "hparam/best_validation_ndcg@10"  # the HParams view's metric


def validation_tag(metric: str) -> str:
    """The tag of a validation metric ("ndcg@10")."""
    return f"metrics/validation/{metric}"


VALIDATION_NDCG = validation_tag("ndcg@10")


@dataclass(frozen=True)
class Run:
    folder: Path   # model_dir/<run>
    log_dir: Path  # tensorboard_dir/<run>

    @classmethod
    def for_training(cls, tc, resume: Optional[Path] = None) -> "Run":
        """The run a config trains (a new one without run_name is named here, by the time), or the
        run in the folder `resume`."""
        if resume:
            return cls(resume, Path(tc.tensorboard_dir) / resume.resolve().name)  # `--resume .` names it too
        tc.run_name = tc.run_name or time.strftime("%Y%m%d-%H%M%S")
        return cls(Path(tc.model_dir) / tc.run_name, Path(tc.tensorboard_dir) / tc.run_name)

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def config_file(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def last(self) -> Path:
        return last_checkpoint(self.folder)

    @property
    def saved(self) -> Path:
        """The checkpoint that says how the run was trained and how far: last.pt, or best.pt where
        a user removed last.pt (a finished run then: nothing is left to resume)."""
        return self.last if self.last.exists() or not self.best.exists() else self.best

    @property
    def curves(self) -> Path:
        return self.folder / "curves.png"

    # ------------------------------------------------------------------ while it trains

    def lock(self) -> Callable[[], None]:
        """Hold the run's lock while it trains; returns its release. The lock sits beside the
        resolved folder, so that a symlink to it or `.` from inside it meets the same lock."""
        real = self.folder.resolve()
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.folder.parent, e, "choose a writable trainer_config.model_dir") from None
        return take_lock(Path(os.path.relpath(real.parent / f".{real.name}.lock")), f"the run {self.folder}")

    def open(self, resume: bool) -> None:
        """A new run creates both folders and refuses names already taken, except by a run that was
        killed before it saved an epoch: that one starts afresh, its own files removed and any other
        kept. A resumed run drops the temporaries a crash may have left."""
        if resume:
            for stale in self.folder.glob(".*.tmp"):
                stale.unlink()
            return
        restart = self.killed_before_first_epoch()
        if restart:
            kept = self.remove_written()
            logger.warning(f"{self.folder} holds a run that was killed before it saved an epoch: starting it afresh"
                           + (f" (kept what it did not write: {', '.join(kept)})" if kept else ""))
        for folder, key in ((self.folder, "model_dir"), (self.log_dir, "tensorboard_dir")):
            if not restart and folder.exists() and any(folder.iterdir()):
                raise UserError(f"{folder} already exists (trainer_config.{key} / run_name); choose another "
                                f"trainer_config.run_name, or continue that run with --resume {self.folder}")
        for folder in (self.folder, self.log_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.remove_written()
                raise write_error(folder, e, "choose writable trainer_config.model_dir and tensorboard_dir") from None
        self.record.touch()

    # ------------------------------------------------------------------ what it wrote

    @property
    def record(self) -> Path:
        """The run's list of the files it wrote, one `run/<name>` or `tensorboard/<name>` a line (a
        name may be a glob pattern)."""
        return self.folder / ".written"

    def wrote(self, path: Path) -> None:
        """Add a file to the record before the run writes it; a file it writes again is listed once."""
        line = f"{'run' if Path(path).parent == self.folder else 'tensorboard'}/{Path(path).name}"
        if line not in self.written():
            with open(self.record, "a") as f:
                f.write(line + "\n")

    def written(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.is_file() else []

    def killed_before_first_epoch(self) -> bool:
        """A run folder with the record of a run that never saved a checkpoint: only a run that
        was killed before the end of its first epoch leaves one (a user's best.pt alone is kept)."""
        return self.record.is_file() and not self.best.exists() and not self.last.exists()

    def remove_written(self) -> list[str]:
        """Remove the files the run recorded (and their temporaries), its record, and each folder
        left empty; the paths of what else was found there, which stay."""
        for line in self.written():
            kind, name = line.split("/", 1)
            folder = self.folder if kind == "run" else self.log_dir
            for path in [*folder.glob(name), *folder.glob(f".{name}.*.tmp")]:
                path.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)
        kept = []
        for folder in (self.folder, self.log_dir):
            if folder.is_dir():
                left = sorted(folder.iterdir())
                kept += [str(p) for p in left]
                if not left:
                    folder.rmdir()
        return kept

    def write_config(self, config: dict) -> None:
        self.wrote(self.config_file)
        atomic_write(self.config_file, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))

    def writer(self) -> SummaryWriter:
        """TensorBoard's writer, its event files recorded first by the pattern of their names (the
        host and process that write them)."""
        from torch.utils.tensorboard import SummaryWriter
        self.wrote(self.log_dir / f"events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*")
        return SummaryWriter(str(self.log_dir))

    def save(self, checkpoint: dict, improved: bool) -> None:
        """last.pt, then best.pt when the epoch improved: a crash between the two leaves last.pt
        holding the best epoch, from which a resumed run restores best.pt (restore_best)."""
        for path in [self.last] + ([self.best] if improved else []):
            self.wrote(path)
            atomic_write(path, lambda tmp: torch_save(checkpoint, tmp))

    def restore_best(self) -> None:
        """Write best.pt anew from last.pt when last.pt holds the best epoch and best.pt does not
        (a run killed between the two writes of that epoch)."""
        state = load_checkpoint(self.last)["state"]
        if state.get("best_epoch") != state["epoch"]:
            return
        if self.best.exists() and load_checkpoint(self.best)["state"]["epoch"] == state["epoch"]:
            return
        logger.warning(f"{self.best} misses epoch {state['epoch']}, the best, whose writing was cut: "
                       f"restored from {self.last}")
        atomic_write(self.best, lambda tmp: shutil.copyfile(self.last, tmp))

    def write_end(self, writer: SummaryWriter, settings: dict, best_ndcg: float,
                  plot: Callable[[pd.DataFrame, Path], object]) -> None:
        """The HParams view's entry (the run's settings beside its result), then curves.png, the
        last file a run writes."""
        writer.add_hparams(settings, {BEST_NDCG: best_ndcg}, run_name=".")
        writer.flush()
        plot(self.scalars(), self.curves)

    def remove_if_unsaved(self, epoch: int) -> str:
        """Remove the files of a run that stopped before it saved an epoch; say what was kept."""
        if self.last.exists():
            return (f"epoch {epoch} is saved; python model_train.py --resume {self.folder} continues with "
                    f"epoch {epoch + 1}")
        kept = self.remove_written()
        return ("no epoch was saved, so the files the run wrote are removed"
                + (f" (kept what it did not write: {', '.join(kept)})" if kept else ""))

    # ------------------------------------------------------------------ once it has trained

    def scalars(self) -> pd.DataFrame:
        """Every scalar TensorBoard holds for the run: columns step, tag, value."""
        from tbparse import SummaryReader
        return SummaryReader(str(self.log_dir)).scalars

    def complete(self) -> bool:
        """Whether the run has nothing left to train and its end is written (curves.png, after
        HParams, is the last file a run writes)."""
        if not self.curves.exists():
            return False
        last = load_checkpoint(self.last)
        return bool(finished(last["state"], saved_config(last).trainer_config))

    def report(self, subset: str = "test", exclude: str = "history", ks: tuple[int, ...] = (10,)) -> Path:
        """eval.py's report of the run's best.pt."""
        return report_path(self.best, subset, exclude, ks)


def run_folder_of(path: Path) -> Path:
    """The run folder a user means by `--resume`: the folder, or the folder of a checkpoint in it."""
    path = Path(path)
    return path.parent if path.suffix == ".pt" and not path.is_dir() else path


def checkpoint_of(path: Path, name: str = "best.pt") -> Path:
    """The checkpoint a user means by `--checkpoint`: a file as given, or a run folder's `name`."""
    path = Path(path)
    return path / name if path.is_dir() else path


def last_checkpoint(folder: Path) -> Path:
    """The checkpoint a run in folder resumes from."""
    return Path(folder) / "last.pt"


def finished(state: dict, tc) -> str:
    """Why a run in this state has nothing left to train under this trainer config ("" while it has)."""
    if state["epoch"] >= tc.num_epochs:
        return f"trained all {tc.num_epochs} epochs of trainer_config.num_epochs; raise it (--set) to train on"
    if tc.patience is not None and state["stale"] >= tc.patience:
        return (f"stopped early after epoch {state['epoch']} (no better validation NDCG@10 for {tc.patience} "
                f"evaluations); raise trainer_config.patience, or set it to null, to train on")
    return ""


def report_path(ranked: Path, subset: str = "test", exclude: str = "history", ks: tuple[int, ...] = (10,),
                penalty: float = 0.0) -> Path:
    """Where eval.py writes the metrics of a checkpoint (or of a predictions CSV): beside it, named
    by subset, exclusion, K and popularity penalty, so that a call with other targets, exclusion,
    K or penalty never replaces another's (a CSV's reports also carry its name)."""
    ranked = Path(ranked)
    prefix = f"{ranked.stem}_" if ranked.suffix == ".csv" else ""
    penalty_part = f"_penalty{penalty:g}" if penalty else ""
    return ranked.parent / f"{prefix}eval_{subset}_{exclude}_k{'-'.join(map(str, ks))}{penalty_part}.json"


def inputs_of(checkpoint: Path, data_dir: str) -> list[Path]:
    """What a script reading this checkpoint must never write over: its run's files and the data."""
    folder = Path(checkpoint).parent
    return [Path(checkpoint), folder / "best.pt", folder / "last.pt", folder / "config.yaml", Path(data_dir)]
