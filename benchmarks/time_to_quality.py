"""Time to quality: validation NDCG@10 against wall-clock minutes, for one or more configs.

    python benchmarks/time_to_quality.py --config configs/ml1m_best.yaml [more configs]
        [--set KEY=VALUE ...] [--seed 1] [--out benchmarks/time_to_quality] [--thresholds 0.17 0.18 0.19]
        [--minutes M]

Each config trains once, as `python model_train.py --config C` does (a fresh run: data loading and
compilation count), while this script notes when it started it. Afterwards every validation's
NDCG@10 is read from the run's TensorBoard events with the minute after the start at which it was
written, beside the run's training and validation minutes so far. Out come curves.csv (a row per
validation), time_to_quality.png (NDCG@10 against minutes, a line per config) and
time_to_quality.md (the minutes each config took to reach each threshold, and its best). With
--minutes, a run still training that long after its start is stopped (SIGTERM: it saves and
ends as after Ctrl-C), so that a long schedule's first stretch joins the picture at a bounded cost.
A config whose run is complete in --out, or was stopped by this script's cap, is read back, not
trained again, so that a new config can join the picture; a run stopped otherwise cannot be timed
and is refused.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from errors import UserError, argument_parser, run_script  # noqa: E402
from files import atomic_write  # noqa: E402
from ranking import markdown_table  # noqa: E402
from run import EPOCH_SECONDS, VALIDATION_NDCG, VALIDATION_SECONDS, Run  # noqa: E402


def run_of(config: Path, seed: int, out: Path) -> Run:
    name = f"{config.stem}-seed{seed}"
    return Run(out / "models" / name, out / "runs" / name)


def train(config: Path, sets: list[str], seed: int, out: Path, minutes: Optional[float]) -> float:
    """Train the config's run in --out (unless this script timed it there before) for at most
    `minutes`, and return when it started (seconds since the epoch), which out/starts.json keeps
    for runs read back later, with the cap that stopped the run (or null)."""
    run, starts_file = run_of(config, seed, out), out / "starts.json"
    starts = json.loads(starts_file.read_text()) if starts_file.exists() else {}
    if run.folder.exists():
        if run.name in starts and (starts[run.name]["capped_at_minutes"] is not None or run.complete()):
            return starts[run.name]["started"]
        raise UserError(f"{run.folder} holds a run this script did not time from its start (stopped, or trained "
                        f"otherwise): move it away to measure {config} anew")
    started = time.time()
    command = [sys.executable, str(ROOT / "model_train.py"), "--config", str(config),
               *(a for s in [*sets, f"trainer_config.seed={seed}", f"trainer_config.run_name={run.name}",
                             f"trainer_config.model_dir={out / 'models'}",
                             f"trainer_config.tensorboard_dir={out / 'runs'}"] for a in ("--set", s))]
    trainer, capped = subprocess.Popen(command, cwd=ROOT), None
    try:
        code = trainer.wait(timeout=None if minutes is None else minutes * 60)
    except subprocess.TimeoutExpired:
        trainer.send_signal(signal.SIGTERM)
        code, capped = trainer.wait(), minutes
    if code != 0 and capped is None:
        raise UserError(f"training {config} failed (exit status {code}; the lines above say why)")
    starts[run.name] = {"started": started, "capped_at_minutes": capped}
    atomic_write(starts_file, lambda tmp: tmp.write_text(json.dumps(starts, indent=1)))
    return started


def curve(run: Run, started: float) -> pd.DataFrame:
    """A row per validation: epoch, minutes since the start, training and validation minutes so
    far (the rest is loading, compiling's first steps outside the epochs, and checkpoints), NDCG@10."""
    from tbparse import SummaryReader
    scalars = SummaryReader(str(run.log_dir), extra_columns={"wall_time"}).scalars
    if scalars.empty or not (scalars.tag == VALIDATION_NDCG).any():
        raise UserError(f"{run.log_dir} holds no validation yet (stopped before its first?): give more --minutes")
    per_epoch = scalars.pivot_table(index="step", columns="tag", values="value")
    validation_s = per_epoch[VALIDATION_SECONDS].fillna(0)
    table = pd.DataFrame({"train_minutes": (per_epoch[EPOCH_SECONDS] - validation_s).cumsum() / 60,
                          "validation_minutes": validation_s.cumsum() / 60})
    ndcg = scalars[scalars.tag == VALIDATION_NDCG].set_index("step")
    table = table.loc[ndcg.index].assign(minutes=(ndcg.wall_time - started) / 60, ndcg=ndcg.value)
    return table.rename_axis("epoch").reset_index()


def summary(curves: dict[str, pd.DataFrame], thresholds: list[float]) -> str:
    """Minutes to reach each validation NDCG@10 threshold (- where never), and the best."""
    rows = []
    for name, c in curves.items():
        reached = [f"{c.minutes[c.ndcg >= t].min():.1f}" if (c.ndcg >= t).any() else "-" for t in thresholds]
        best = c.loc[c.ndcg.idxmax()]
        last = c.iloc[-1]
        rows.append([name, *reached, f"{best.ndcg:.4f} (epoch {best.epoch:.0f}, {best.minutes:.1f} min)",
                     f"{last.minutes:.1f}", f"{last.train_minutes:.1f} / {last.validation_minutes:.1f}"])
    return markdown_table(["config", *(f"minutes to {t}" for t in thresholds), "best validation NDCG@10",
                           "minutes in all", "training / validation minutes"], rows)


def draw(curves: dict[str, pd.DataFrame], path: Path, machine: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        axes.plot(c.minutes, c.ndcg, marker="o", markersize=3, label=name)
    axes.set(xlabel="minutes since the start (wall clock)", ylabel="validation NDCG@10", title=machine)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def machine_name() -> str:
    """The GPU's name, or the CPU's (from /proc/cpuinfo where there is one) and its cores."""
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: Optional[list[str]] = None) -> dict[str, pd.DataFrame]:
    parser = argument_parser(__doc__)
    parser.add_argument("--config", type=Path, nargs="+", required=True, help="configs to train and compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "time_to_quality")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.17, 0.18, 0.19])
    parser.add_argument("--minutes", type=float, help="stop each run this long after its start (default: none)")
    args = parser.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        parser.error(f"--minutes {args.minutes}: give a positive number of minutes")
    missing = [str(c) for c in args.config if not c.is_file()]
    if missing:
        parser.error(f"--config {' '.join(missing)}: no such file")
    args.out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for config in args.config:
        started = train(config, args.set, args.seed, args.out, args.minutes)
        curves[config.stem] = curve(run_of(config, args.seed, args.out), started)
    machine = machine_name()
    table = pd.concat([c.assign(config=name) for name, c in curves.items()])
    atomic_write(args.out / "curves.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
    text = f"{machine}, seed {args.seed}\n\n{summary(curves, args.thresholds)}\n"
    atomic_write(args.out / "time_to_quality.md", lambda tmp: tmp.write_text(text))
    draw(curves, args.out / "time_to_quality.png", machine)
    print(text + f"wrote {args.out / 'curves.csv'}, time_to_quality.md and time_to_quality.png")
    return curves


if __name__ == "__main__":
    sys.exit(run_script(main))
