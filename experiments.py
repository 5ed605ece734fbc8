"""Run a config over several seeds and named variants, one after another, into one results table.

    python experiments.py --config configs/ml100k_best.yaml --seeds 3 [--grid grid.yaml] [--variants base ...]
                          [--set k=v ...] [--out experiments/<name>] [--against base] [--commands]

A grid file maps variant names to the overrides that make them (`base: {}` is the config itself):

    base: {}
    no-user-embedding: {model_config.user_embedding_dimension: 0}
    window-mode: {model_config.mode: window, model_config.transformer_config.context_window_size: 5}

Each variant and seed is one `python model_train.py` run (its seed `trainer_config.seed` = 1, 2,
...), chosen on validation NDCG@10 as always, then one `python eval.py` of its best.pt: the test
targets are read once per finished run. `results.csv` and `results.md` in --out hold a row per
run (variant, what its model knows of time, seed, best epoch, validation and test metrics with
the test's bootstrap interval, minutes) and mean +- standard deviation per variant, beside the most-rated baseline on the same
test targets (a run below it has learnt less than popularity). Every run also lands in TensorBoard's
HParams view (`tensorboard --logdir <out>/runs`). Each run's log shows as it trains. With
`--against base`, `paired.md` then holds each other variant's paired NDCG@10 difference to the base
of the same seed, with its interval and p-value, on validation (what a choice may read) and test. A finished
run is not run again; a stopped one resumes from its last.pt. Either must have been trained with
the config the sweep asks for now (where and how fast aside), or the sweep stops and says which key.

`--variants` runs only the named variants of the grid. `--commands` prints the `model_train.py`
command of each run not yet finished, one a line, and trains nothing: to spread a sweep over
several GPUs or machines, after which the same sweep without `--commands` reads the runs back,
resumes the stopped ones, and evaluates. (On one GPU, runs side by side are no faster than one
after another: benchmarks/README.md.)
"""
from __future__ import annotations

import errors  # before the libraries: Ctrl-C while they load is one line
errors.quiet_while_loading()

import argparse
import csv
import json
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from checkpoint import load_checkpoint, saved_config
from config import DEFAULT_CONFIG, Config, changed_settings, declared_keys, load_config, parse_yaml
from errors import ConfigError, Interrupted, UserError, argument_parser, run_script
from files import atomic_write
from ranking import markdown_table, signed
from run import EPOCH_SECONDS, Run, validation_tag

ROOT = Path(__file__).resolve().parent
COLUMNS = ["variant", "time", "seed", "best_epoch", "validation_ndcg@10", "validation_hr@10", "test_ndcg@10", "test_hr@10",
           "test_mrr", "test_ndcg@10_low", "test_ndcg@10_high", "minutes", "most_rated_test_ndcg@10",
           "most_rated_test_hr@10", "most_rated_test_mrr", "test_coverage@10", "test_long-tail@10", "test_novelty@10"]
SUMMARY = ["validation_ndcg@10", "test_ndcg@10", "test_hr@10", "test_mrr"]
NAMES = {"best_epoch": "best epoch", "validation_ndcg@10": "validation NDCG@10", "validation_hr@10": "validation HR@10",
         "test_ndcg@10": "test NDCG@10", "test_hr@10": "test HR@10", "test_mrr": "test MRR"}  # the tables' headers
YARDSTICK = "most-rated (training counts)"
def read_grid(path: Optional[Path]) -> dict[str, list[str]]:
    """Variant name -> `--set` overrides, from a grid file (or just the config, as `base`)."""
    if path is None:
        return {"base": []}
    grid = parse_yaml(path, "grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: expected a mapping of variant names to overrides "
                          "(base: {}, no-user-embedding: {model_config.user_embedding_dimension: 0})")
    for name, overrides in grid.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variant {name} must map config keys to values, got {overrides!r}")
    return {str(name): [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]
            for name, overrides in grid.items()}


def check_variants(parser: argparse.ArgumentParser, option: str, names: list[str], grid: dict,
                   path: Optional[Path]) -> None:
    """A usage error naming the variants of an option that the grid lacks, before anything runs."""
    unknown = [name for name in names if name not in grid]
    if unknown:
        parser.error(f"{option} {' '.join(unknown)}: not a variant of {path or 'the sweep'} "
                     f"(its variants: {', '.join(grid)})")


def run_child(command: list[str], what: str) -> None:
    """Run a repo script as a process that writes to this one's terminal (its log and progress
    bars show as they come). It runs in a session of its own, so that Ctrl-C, `kill -INT` and
    `kill -TERM` all reach the sweep alone, which hands the run one SIGTERM (a sweep started in
    the background ignores SIGINT, and so would its runs): the run keeps what it can, then the
    sweep stops, even where the run was about to finish anyway."""
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGTERM)
        process.wait()
        code = Interrupted.exit_code
    if code in (Interrupted.exit_code, -signal.SIGINT, -signal.SIGTERM):
        raise Interrupted(f"the sweep stopped during {what}; the same command goes on from there")
    if code < 0:
        raise UserError(f"{what} was killed (signal {-code}); the same command resumes it from its last checkpoint")
    if code != 0:
        raise UserError(f"{what} failed (exit status {code}; the lines above say why)")


def run_settings(overrides: list[str], variant: str, seed: int, out: Path) -> tuple[Run, list[str]]:
    """A run of the sweep and the `--set` overrides that make it."""
    name = f"{variant}-seed{seed}"
    sets = [*overrides, f"trainer_config.seed={seed}", f"trainer_config.run_name={name}",
            f"trainer_config.model_dir={out / 'models'}", f"trainer_config.tensorboard_dir={out / 'runs'}"]
    return Run(out / "models" / name, out / "runs" / name), sets


def check_same_run(run: Run, wanted: Config) -> None:
    """A run folder the sweep finds is read back or resumed only if it was trained as the sweep
    asks now: a grid or --set changed since gets a ConfigError, not the old run's numbers."""
    declared = declared_keys()
    for key, (saved, value) in changed_settings(saved_config(load_checkpoint(run.saved)), wanted).items():
        if declared[key].run:
            raise ConfigError(f"{run.folder} was trained with {key}={saved!r}, this sweep asks for {value!r}: "
                              f"move that folder away or give another --out")


def training_command(config: Path, run: Run, sets: list[str]) -> Optional[list[str]]:
    """The model_train.py arguments that train a run of the sweep (run_settings), or resume it
    where it stopped; None for a complete run (or one whose last.pt a user removed)."""
    if run.saved.exists():
        finished = run.saved == run.best or run.complete()
        return None if finished else ["model_train.py", "--resume", str(run.folder)]
    return ["model_train.py", "--config", str(config), *(a for s in sets for a in ("--set", s))]


def one_run(config: Path, overrides: list[str], variant: str, seed: int, out: Path,
            against: Optional[Path] = None) -> dict:
    """Train one variant at one seed (unless it finished before), evaluate its best.pt once (paired
    with the test report `against` already where there is one, so that --against needs no second
    evaluation of the test targets)."""
    run, sets = run_settings(overrides, variant, seed, out)
    command = training_command(config, run, sets)
    if command is not None:
        run_child(command, f"training {run.name}")
    test = report_of(run, "test", against if against is not None and against.exists() else None)
    checkpoint = load_checkpoint(run.best)
    best = checkpoint["state"]
    scalars = run.scalars()
    at_best = scalars[(scalars.step == best["epoch"]) & (scalars.tag == validation_tag("hr@10"))].value
    model, baseline = test["results"]["model"], test["results"]["most-rated"]
    return {"variant": variant, "time": saved_config(checkpoint).model_config.time_use, "seed": seed,
            "best_epoch": best["epoch"], "validation_ndcg@10": best["best_ndcg"],
            "validation_hr@10": float(at_best.iloc[-1]) if len(at_best) else float("nan"),
            "test_ndcg@10": model["ndcg@10"], "test_hr@10": model["hr@10"], "test_mrr": model["mrr"],
            "test_ndcg@10_low": test["intervals"]["model"]["ndcg@10"][0],
            "test_ndcg@10_high": test["intervals"]["model"]["ndcg@10"][1],
            "minutes": scalars[scalars.tag == EPOCH_SECONDS].value.sum() / 60,
            **{f"most_rated_test_{metric}": baseline[metric] for metric in ("ndcg@10", "hr@10", "mrr")},
            **{f"test_{metric}": model[metric] for metric in ("coverage@10", "long-tail@10", "novelty@10")}}


def report_of(run: Run, subset: str, against: Optional[Path] = None) -> dict:
    """eval.py's report of a run's best.pt on a subset (with `against`, an eval_*.json report of
    another run on the same targets: the paired difference to it), made unless it exists already."""
    report = run.report(subset)
    wanted = str(against) if against else None
    if not report.exists() or stale(json.loads(report.read_text()), wanted):
        run_child(["eval.py", "--checkpoint", str(run.best), "--subset", subset, "--k", "10",
                   *(["--against", wanted] if against else [])], f"evaluating {run.name} on {subset}")
    return json.loads(report.read_text())


def stale(report: dict, against: Optional[str]) -> bool:
    """Whether an eval report lacks what the sweep reads: the lists' metrics (reports written before
    eval.py had them) or the paired difference to `against`."""
    return ("coverage@10" not in report.get("results", {}).get("model", {})
            or against is not None and against not in (report.get("paired_difference") or {}))


def paired_table(out: Path, grid: dict, seeds: int, base: str) -> str:
    """Per variant and seed, its paired NDCG@10 difference to the base variant of the same seed, on
    validation and test (the mean over seeds says little where the seeds disagree)."""
    subsets = ("validation", "test")
    runs = {(variant, seed): run_settings([], variant, seed, out)[0]
            for variant in grid for seed in range(1, seeds + 1)}
    for seed, subset in ((seed, subset) for seed in range(1, seeds + 1) for subset in subsets):
        report_of(runs[base, seed], subset)  # what the variants are paired against
    rows = [[variant, seed, *(signed(report_of(runs[variant, seed], subset, runs[base, seed].report(subset))
                                     ["paired_difference"][str(runs[base, seed].report(subset))]["ndcg@10"])
                          for subset in subsets)]
            for variant in grid if variant != base for seed in range(1, seeds + 1)]
    return markdown_table(["variant", "seed", f"validation NDCG@10 - {base}", f"test NDCG@10 - {base}"], rows) + "\n"


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of each summary metric per variant."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "time": mine[0]["time"], "runs": len(mine)}
        for metric in SUMMARY:
            values = [r[metric] for r in mine]
            entry[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def markdown(rows: list[dict], summary: list[dict]) -> str:
    """The summary (mean ± std per variant, then the most-rated baseline on the same test targets)
    and a row per run, with readable headers."""
    table = [[s["variant"], s["time"], s["runs"], *(f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in SUMMARY)]
             for s in summary]
    baselines = {tuple(r[f"most_rated_{m}"] for m in SUMMARY[1:]): r["variant"] for r in rows}
    for values, variant in baselines.items():  # one row, unless variants differ in data or split
        name = YARDSTICK if len(baselines) == 1 else f"{YARDSTICK}, {variant}'s data"
        table.append([name, "none", "", "", *(f"{v:.4f}" for v in values)])
    runs = [[r["variant"], r["time"], r["seed"], r["best_epoch"], *(f"{r[c]:.4f}" for c in COLUMNS[4:9]),
             f"[{r['test_ndcg@10_low']:.4f}, {r['test_ndcg@10_high']:.4f}]", f"{r['minutes']:.1f}"] for r in rows]
    return (markdown_table(["variant", "time", "runs", *(NAMES[m] for m in SUMMARY)], table) + "\n\n"
            + markdown_table(["variant", "time", "seed", *(NAMES[c] for c in COLUMNS[3:9]), "test NDCG@10 95% interval",
                              "minutes"], runs) + "\n")


def write_tables(out: Path, rows: list[dict]) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(out / "results.csv", write_csv)
    text = markdown(rows, summary_rows(rows))
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(text))


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the config every variant starts from")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N for every variant")
    parser.add_argument("--grid", type=Path, help="YAML: variant name -> overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for every run (repeatable)")
    parser.add_argument("--out", type=Path, help="folder for runs and tables (default: experiments/<config>)")
    parser.add_argument("--against", metavar="VARIANT",
                        help="after the runs, each other variant's paired NDCG@10 difference to this one, seed by "
                             "seed, on validation and test (eval.py --against), into paired.md")
    parser.add_argument("--variants", nargs="+", metavar="VARIANT", help="only these variants of the grid")
    parser.add_argument("--commands", action="store_true",
                        help="print the model_train.py command of each run not yet finished, one a line, and train "
                             "nothing (to spread the runs over GPUs or machines)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    grid = read_grid(args.grid)
    check_variants(parser, "--variants", args.variants or [], grid, args.grid)
    grid = {v: grid[v] for v in args.variants} if args.variants else grid
    check_variants(parser, "--against", [args.against] if args.against else [], grid, args.grid)
    load_config(args.config, args.overrides)  # every variant's config checked before the first run
    for variant, overrides in grid.items():
        load_config(args.config, [*args.overrides, *overrides], f"{args.grid}, variant {variant}")
    out = (args.out or Path("experiments") / args.config.stem).resolve()
    runs = [(variant, seed, [*args.overrides, *overrides]) for variant, overrides in grid.items()
            for seed in range(1, args.seeds + 1)]
    commands = []
    for variant, seed, overrides in runs:  # every run already there checked before anything is written
        run, sets = run_settings(overrides, variant, seed, out)
        if run.saved.exists():
            check_same_run(run, load_config(args.config.resolve(), sets))
        commands.append(training_command(args.config.resolve(), run, sets))
    if args.commands:  # the runs left, for the caller to start where it likes
        for command in filter(None, commands):
            print(shlex.join([sys.executable, str(ROOT / command[0]), *command[1:]]), flush=True)
        return []
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "grid.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(
        {"config": str(args.config), "overrides": args.overrides, "grid": grid}, sort_keys=False)))
    rows = []
    for variant, seed, overrides in runs:
        base = run_settings([], args.against, seed, out)[0].report("test") if args.against not in (None, variant) else None
        rows.append(one_run(args.config.resolve(), overrides, variant, seed, out, base))
        write_tables(out, rows)
        print(f"{variant} seed {seed}: validation NDCG@10 {rows[-1]['validation_ndcg@10']:.4f}, "
              f"test NDCG@10 {rows[-1]['test_ndcg@10']:.4f}", flush=True)
    print((out / "results.md").read_text())
    if args.against is not None:
        table = paired_table(out, grid, args.seeds, args.against)
        atomic_write(out / "paired.md", lambda tmp: tmp.write_text(table))
        print(table)
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main))
