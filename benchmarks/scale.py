"""Loading a MovieLens-32M-size folder: time and peak memory, from the raw files and from the cache.

    python benchmarks/scale.py [--ratings 32000000] [--format csv] [--folder data/synthetic-ml-32m]

The folder is generated once by synthetic.py in the release's format (ML-32M's 200,948 users and
87,585 movies by default) unless it exists. Each measurement runs in a fresh process and times
read + tokenize + order + split + datasets of the default config (`build.make_datasets`), the
first without the cache, then with it (written by a run before), and reports the process's peak
resident memory (VmHWM). Goals on the 2-core development machine: <= 30 s from the raw files,
<= 3 s from the cache, <= 4 GB peak.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build import make_datasets  # noqa: E402
from config import load_config  # noqa: E402
from data import load_movielens  # noqa: E402
from errors import run_script  # noqa: E402
from measure import peak_rss_of_this_process  # noqa: E402
from ranking import markdown_table  # noqa: E402
from releases import FORMATS  # noqa: E402
from synthetic import write_movielens  # noqa: E402


def measure_load(folder: Path, cache: bool, overrides: list[str]) -> dict:
    """Seconds and peak RSS (MB) of loading folder into the configured datasets, in this process."""
    start = time.perf_counter()
    config = load_config(overrides=[f"trainer_config.data_dir={folder}", *overrides])
    datasets = make_datasets(config, load_movielens(folder, cache=cache))
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_of_this_process(),
            "ratings": datasets["train"].data.num_ratings, "training_targets": len(datasets["train"])}


def in_fresh_process(folder: Path, cache: bool, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--folder", str(folder), "--probe", "cached" if cache else "raw",
               *(a for o in overrides for a in ("--set", o))]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--folder", type=Path, default=Path("data/synthetic-ml-32m"))
    parser.add_argument("--format", choices=list(FORMATS), default="csv")
    parser.add_argument("--ratings", type=int, default=32_000_204)
    parser.add_argument("--users", type=int, default=200_948)
    parser.add_argument("--movies", type=int, default=87_585)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides for the datasets, e.g. model_config.mode=sequence")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--probe", choices=("raw", "cached"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(measure_load(args.folder, args.probe == "cached", args.overrides)))
        return
    if not args.folder.is_dir():
        start = time.perf_counter()
        write_movielens(args.folder, args.format, args.users, args.movies, args.ratings)
        print(f"generated {args.folder} in {time.perf_counter() - start:.0f} s")
    raw = in_fresh_process(args.folder, False, args.overrides)
    in_fresh_process(args.folder, True, args.overrides)  # writes the cache
    cached = in_fresh_process(args.folder, True, args.overrides)
    print(f"{args.folder}: {raw['ratings']:,} ratings, {raw['training_targets']:,} training targets")
    print(markdown_table(["load", "seconds", "peak RSS (MB)", "goal"], [
        ["from the raw files", f"{raw['seconds']:.1f}", f"{raw['peak_rss_mb']:,.0f}", "<= 30 s, <= 4,096 MB"],
        ["from the cache", f"{cached['seconds']:.1f}", f"{cached['peak_rss_mb']:,.0f}", "<= 3 s"]]))
    if args.json:
        args.json.write_text(json.dumps({"raw": raw, "cached": cached}, indent=2))


if __name__ == "__main__":
    sys.exit(run_script(main))
