"""Evaluate a checkpoint against popularity baselines: python eval.py --checkpoint PATH

Every scorer ranks all movies for each target with the movies the user rated before it removed
(`--exclude window` removes only the input window, as the post did). One target per user and
split, so MAP@K equals MRR@K and Recall@K equals HR@K; Precision@K is HR@K / K. Prints the
table, writes it as JSON beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from checkpoint import data_for_checkpoint, load_checkpoint, model_from_checkpoint
from config import make_datasets, pick_device
from errors import UserError, run_script
from files import atomic_write
from plots import plot_results
from ranking import (constant_scorer, markdown_table, metrics_from_ranks, model_scorer, popularity_baselines,
                     prediction_writer, rank_all)


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--exclude", choices=("history", "window"), default="history",
                        help="history: every movie rated before the target (default); "
                             "window: only the input window, as the post did")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--save-predictions", type=Path, metavar="CSV")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="bar chart of model vs baselines")
    args = parser.parse_args(argv)
    if min(args.k) < 1 or args.batch_size < 1:
        parser.error("every --k and --batch-size must be at least 1")

    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint))
    if max(args.k) > metadata.num_movies:
        raise UserError(f"--k {max(args.k)} is more than the {metadata.num_movies:,} movies of {metadata.name}; "
                        f"give K of at most {metadata.num_movies:,}")
    datasets = make_datasets(config, data_for_checkpoint(config, metadata, args.data_dir))
    device = pick_device(args.device)
    model.to(device)
    dataset = datasets[args.split].to(device)
    ks = tuple(sorted(args.k))
    scorers = {"model": model_scorer(model)}
    scorers.update({name: constant_scorer(s) for name, s in popularity_baselines(dataset).items()})
    results = {}
    if args.save_predictions:  # streamed batch by batch: 200,000 users' scores never exist at once
        def rank_and_write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                ranks, _ = rank_all(scorers["model"], dataset, args.exclude, args.batch_size, max(ks),
                                    top_sink=prediction_writer(f, metadata))
            results["model"] = metrics_from_ranks(ranks, ks)
        atomic_write(args.save_predictions, rank_and_write)
    for name, scorer in scorers.items():
        if name not in results:
            results[name] = metrics_from_ranks(rank_all(scorer, dataset, args.exclude, args.batch_size)[0], ks)
    split = config.trainer_config.split
    print(f"{metadata.name}, split {split} ({args.split}, {len(dataset):,} targets), "
          f"exclude {args.exclude}, ranking over all {metadata.num_movies:,} movies")
    print(markdown_table(results, ks))
    print("One target per user: MAP@K equals MRR@K and Recall@K equals HR@K.")
    if split == "random_windows":
        print("random_windows is the post's split: its training windows overlap the future, so "
              "these numbers are leaky.")
    if args.plot:
        plot_results(results, ks, args.plot)
    out = args.checkpoint.parent / f"eval_{args.split}_{args.exclude}.json"
    report = json.dumps({"split": split, "subset": args.split, "exclude": args.exclude, "targets": len(dataset),
                         "results": results}, indent=2)
    atomic_write(out, lambda tmp: tmp.write_text(report))
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
