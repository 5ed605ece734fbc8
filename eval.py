"""Evaluate a checkpoint against popularity baselines: python eval.py --checkpoint PATH

Every scorer ranks all movies for each target with the movies the user rated before it removed
(`--exclude window` removes only the input window, as the post did). One target per user and
split, so MAP@K equals MRR@K and Recall@K equals HR@K; Precision@K is HR@K / K. Prints HR,
NDCG and MRR at each K (--all-metrics: every metric) and writes every metric as JSON beside the
checkpoint, named by subset, exclusion and K, with the model's rank of each target, so that a
later --against can pair with it when its checkpoint is gone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from checkpoint import data_for_checkpoint, inputs_of, load_checkpoint, metrics_report, model_from_checkpoint
from build import make_datasets, pick_device
from data import EXCLUDE, with_context
from errors import UserError, argument_parser, run_script
from files import atomic_write, refuse_to_overwrite
from plots import plot_results
from ranking import (HEADLINE, METRICS, bootstrap_intervals, constant_scorer, grouped_metrics, grouped_table,
                     liked_targets, markdown_table, model_scorer, paired_difference, per_user_metrics,
                     popularity_baselines, prediction_writer, rank_all, target_groups)


MAX_RESAMPLES = 100_000  # about two minutes a table of ML-1M users on 2 CPU cores


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt or last.pt")
    parser.add_argument("--subset", choices=("test", "validation"),
                        help="the targets to rank: each user's last rating (test, the default) or the one before it")
    parser.add_argument("--split", choices=("test", "validation"), dest="old_subset", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, nargs="+", default=[10], help="the cut-offs K of the metrics")
    parser.add_argument("--all-metrics", action="store_true",
                        help="print MAP, Precision, Recall and full MRR too (the JSON always holds them)")
    parser.add_argument("--exclude", choices=EXCLUDE, default="history",
                        help="history: every movie rated before the target (default); "
                             "window: only the input window, as the post did")
    parser.add_argument("--against", metavar="CHECKPOINT|REPORT|BASELINE",
                        help="another checkpoint, an eval_*.json report of one (on the same targets), or most-rated "
                             "or top-rated-popular: the model's paired difference to it per metric, with its interval "
                             "and p-value")
    parser.add_argument("--buckets", action="store_true",
                        help="each metric by the user's number of ratings before the target and by the target's "
                             "popularity, with intervals (and --against's paired difference)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples over users (1,000 take about a second for ML-1M's 6,040 users "
                             f"on 2 CPU cores; at most {MAX_RESAMPLES:,})")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=1024, help="targets ranked at once")
    parser.add_argument("--save-predictions", type=Path, metavar="CSV",
                        help="write the model's top K per user here (user_id,rank,item_id)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="bar chart of model vs baselines")
    args = parser.parse_args(argv)
    if args.old_subset:
        print("note: --split is now called --subset (trainer_config.split names the protocol)", file=sys.stderr)
    args.subset = args.subset or args.old_subset or "test"
    if min(args.k) < 1 or args.batch_size < 1 or not 10 <= args.resamples <= MAX_RESAMPLES:
        parser.error(f"every --k and --batch-size must be at least 1, --resamples from 10 to {MAX_RESAMPLES:,}")

    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint))
    inputs = inputs_of(args.checkpoint, config, args.data_dir)
    refuse_to_overwrite(args.save_predictions, "--save-predictions", inputs)
    refuse_to_overwrite(args.plot, "--plot", inputs)
    if max(args.k) > metadata.num_movies:
        raise UserError(f"--k {max(args.k)} is more than the {metadata.num_movies:,} movies of {metadata.name}; "
                        f"give K of at most {metadata.num_movies:,}")
    data = data_for_checkpoint(config, metadata, args.data_dir)
    device = pick_device(args.device)
    dataset = make_datasets(config, data)[args.subset].to(device)
    ks = tuple(sorted(args.k))
    scorers = {"model": model_scorer(model.to(device))}
    scorers.update({name: constant_scorer(s) for name, s in popularity_baselines(dataset).items()})
    reported = None  # an earlier report's ranks, read (and checked) before any ranking
    if args.against and args.against.endswith(".json"):
        reported = ranks_of_report(Path(args.against), dataset, args.subset, args.exclude)
    elif args.against and args.against not in scorers:
        scorers[args.against] = other_checkpoint_scorer(Path(args.against), dataset, data, device)
    ranks = {}
    if args.save_predictions:  # streamed batch by batch: 200,000 users' scores never exist at once
        def rank_and_write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                ranks["model"] = rank_all(scorers["model"], dataset, args.exclude, args.batch_size, max(ks),
                                          top_sink=prediction_writer(f, metadata))[0]
        atomic_write(args.save_predictions, rank_and_write)
    for name, scorer in scorers.items():
        if name not in ranks:
            ranks[name] = rank_all(scorer, dataset, args.exclude, args.batch_size)[0]
    if reported is not None:
        ranks[args.against] = reported
    per_user = {name: per_user_metrics(r, ks) for name, r in ranks.items()}
    results = {name: {metric: v.mean().item() for metric, v in values.items()} for name, values in per_user.items()}
    intervals = {name: bootstrap_intervals(values, args.resamples) for name, values in per_user.items()}
    split = config.trainer_config.split
    print(f"{metadata.name}, split {split} ({args.subset}, {len(dataset):,} targets), exclude {args.exclude}, "
          f"ranking over all {metadata.num_movies:,} movies; [95% bootstrap interval over users]")
    print(f"the model's time: {config.model_config.time_use}" + (
        " (it reads each target's timestamp: the moment the recommendation is asked for)"
        if config.model_config.query_time else ""))
    print(markdown_table(results, ks, intervals, METRICS if args.all_metrics else HEADLINE))
    print("One target per user: MAP@K equals MRR@K and Recall@K equals HR@K"
          + ("." if args.all_metrics else "; --all-metrics prints them, and Precision@K and full MRR."))
    comparison = None
    if args.against:
        comparison = paired_difference(per_user["model"], per_user[args.against], args.resamples)
        print(f"\nmodel - {args.against}, paired over the same {len(dataset):,} targets:")
        print("| metric | difference | 95% interval | p-value |\n|---|---|---|---|")
        for metric, c in comparison.items():
            print(f"| {metric} | {c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | {c['p_value']:.4f} |")
    liked = grouped_metrics(per_user, liked_targets(dataset), args.resamples, args.against)
    print("\nAn extra, not the protocol's metric: the targets the user rated 4-5 stars only (the leave-one-out "
          "target is every rating, liked or not):")
    print(grouped_table(liked, ks, args.against))
    buckets = None
    if args.buckets:
        buckets = grouped_metrics(per_user, target_groups(dataset), args.resamples, args.against)
        print("\nBy the user's number of ratings before the target, and by the target's popularity (the 10% "
              "most-rated movies of the training ratings against the rest):")
        print(grouped_table(buckets, ks, args.against))
    if split == "random_windows":
        print("random_windows is the post's split: its training windows overlap the future, so "
              "these numbers are leaky.")
    if args.save_predictions:
        print(f"wrote {args.save_predictions} (the model's top {max(ks)} per user)")
    if args.plot:
        plot_results(results, ks, args.plot)
        print(f"wrote {args.plot}")
    out = metrics_report(args.checkpoint, args.subset, args.exclude, ks)
    report = json.dumps({"split": split, "subset": args.subset, "time": config.model_config.time_use, "exclude": args.exclude, "k": list(ks),
                         "targets": len(dataset), "results": results, "intervals": intervals,
                         "resamples": args.resamples, "against": args.against, "paired_difference": comparison,
                         "liked_targets": liked, "buckets": buckets,
                         "targets_of": {"users": [metadata.user_ids[u] for u in dataset.user_tokens.tolist()],
                                        "movies": [metadata.movie_ids[m] for m in dataset.target_tokens.tolist()]},
                         "model_ranks": ranks["model"].tolist()},
                        indent=2)
    atomic_write(out, lambda tmp: tmp.write_text(report))
    print(f"wrote {out}")
    return results



def ranks_of_report(path: Path, dataset, subset: str, exclude: str) -> torch.Tensor:
    """The model ranks an eval.py report holds, checked to be of the same targets (users and target
    movies, in order), subset and exclusion."""
    try:
        report = json.loads(path.read_text())
        ranks, targets = report["model_ranks"], report["targets_of"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--against {path} is not an eval.py report with the model's ranks ({type(e).__name__}: {e}); "
                        "give an eval_*.json that eval.py wrote") from None
    metadata = dataset.metadata
    ours = {"users": [metadata.user_ids[u] for u in dataset.user_tokens.tolist()],
            "movies": [metadata.movie_ids[m] for m in dataset.target_tokens.tolist()]}
    if (report.get("subset"), report.get("exclude")) != (subset, exclude) or targets != ours:
        raise UserError(f"--against {path} ranks other targets (subset {report.get('subset')}, exclude "
                        f"{report.get('exclude')}, {len(targets.get('users', []))} targets); the paired difference needs "
                        f"the same {len(dataset):,} targets of --subset {subset} --exclude {exclude}")
    return torch.tensor(ranks)


def other_checkpoint_scorer(path: Path, dataset, data, device):
    """The scorer of another checkpoint's model on the same targets (its own context length)."""
    other, other_config, other_metadata = model_from_checkpoint(load_checkpoint(path))
    if not other_metadata.same_data(dataset.metadata):
        raise UserError(f"--against {path} was trained on other data ({other_metadata.name}); give a checkpoint "
                        f"of {dataset.metadata.name}")
    theirs = make_datasets(other_config, data)[dataset.subset].to(device)
    if other_config.trainer_config.split != dataset.split or not torch.equal(theirs.target_tokens, dataset.target_tokens):
        raise UserError(f"--against {path} uses another split ({other_config.trainer_config.split}); "
                        "the paired difference needs the same targets")
    scorer = model_scorer(other.to(device))
    c = other_config.model_config.transformer_config.context_window_size
    return lambda batch: scorer(with_context(batch, dataset.device_data, c))


if __name__ == "__main__":
    sys.exit(run_script(main))
