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

from build import make_datasets, pick_device
from checkpoint import check_same_data, data_for_checkpoint, load_checkpoint, model_from_checkpoint
from data import EXCLUDE, with_context
from errors import UserError, argument_parser, run_script
from files import atomic_write, refuse_to_overwrite
from plots import plot_results
from ranking import (HEADLINE, METRICS, Scorer, bootstrap_intervals, constant_scorer, grouped_metrics, grouped_table,
                     liked_targets, markdown_table, metrics_table, model_scorer, paired_difference, per_user_metrics,
                     popularity_baselines, prediction_writer, rank_all, target_groups)
from run import inputs_of, report_path


MAX_RESAMPLES = 100_000  # about two minutes a table of ML-1M users on 2 CPU cores


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """Load, rank, summarize, print, write: eval.py's stages."""
    args = parse_arguments(argv)
    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint))
    check_outputs(args, config, metadata)
    data = data_for_checkpoint(config, metadata, args.data_dir)
    dataset = make_datasets(config, data)[args.subset].to(pick_device(args.device))
    scorers, reported = make_scorers(args, model, dataset, data, config.trainer_config.data_dir)
    ranks = rank_every_scorer(args, scorers, dataset)
    if reported is not None:
        ranks[args.against] = reported
    report = summarize(args, ranks, dataset)
    print_report(args, report, config, dataset)
    write_report(args, report, config, dataset, ranks["model"])
    return report["results"]


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
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
    args.ks = tuple(sorted(args.k))
    return args


def check_outputs(args: argparse.Namespace, config, metadata) -> None:
    """Refuse, before any ranking, outputs that would overwrite the run or the data, and a K
    larger than the catalog."""
    inputs = inputs_of(args.checkpoint, args.data_dir or config.trainer_config.data_dir)
    refuse_to_overwrite(args.save_predictions, "--save-predictions", inputs)
    refuse_to_overwrite(args.plot, "--plot", inputs)
    if max(args.ks) > metadata.num_movies:
        raise UserError(f"--k {max(args.ks)} is more than the {metadata.num_movies:,} movies of {metadata.name}; "
                        f"give K of at most {metadata.num_movies:,}")


def make_scorers(args: argparse.Namespace, model, dataset, data,
                 data_dir: str) -> tuple[dict[str, Scorer], Optional[torch.Tensor]]:
    """The model, both popularity baselines and --against's checkpoint; or --against's report's
    ranks, read (and checked) before any ranking."""
    scorers = {"model": model_scorer(model.to(dataset.device))}
    scorers.update({name: constant_scorer(s) for name, s in popularity_baselines(dataset).items()})
    if args.against and args.against.endswith(".json"):
        return scorers, ranks_of_report(Path(args.against), dataset, args.subset, args.exclude)
    if args.against and args.against not in scorers:
        scorers[args.against] = other_checkpoint_scorer(Path(args.against), dataset, data, data_dir)
    return scorers, None


def rank_every_scorer(args: argparse.Namespace, scorers: dict[str, Scorer], dataset) -> dict[str, torch.Tensor]:
    """Each scorer's rank of every target; the model's top K written to --save-predictions as it
    ranks, batch by batch (200,000 users' scores never exist at once)."""
    ranks = {}
    if args.save_predictions:
        def rank_and_write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                ranks["model"] = rank_all(scorers["model"], dataset, args.exclude, args.batch_size, max(args.ks),
                                          top_sink=prediction_writer(f, dataset.metadata))[0]
        atomic_write(args.save_predictions, rank_and_write)
    for name, scorer in scorers.items():
        if name not in ranks:
            ranks[name] = rank_all(scorer, dataset, args.exclude, args.batch_size)[0]
    return ranks


def summarize(args: argparse.Namespace, ranks: dict[str, torch.Tensor], dataset) -> dict:
    """Every metric per scorer with its interval, --against's paired difference, and the metrics
    of the liked targets and (--buckets) of each group of targets."""
    per_user = {name: per_user_metrics(r, args.ks) for name, r in ranks.items()}
    return {"results": {name: {metric: v.mean().item() for metric, v in values.items()}
                        for name, values in per_user.items()},
            "intervals": {name: bootstrap_intervals(values, args.resamples) for name, values in per_user.items()},
            "paired_difference": (paired_difference(per_user["model"], per_user[args.against], args.resamples)
                                  if args.against else None),
            "liked_targets": grouped_metrics(per_user, liked_targets(dataset), args.resamples, args.against),
            "buckets": (grouped_metrics(per_user, target_groups(dataset), args.resamples, args.against)
                        if args.buckets else None)}


def print_report(args: argparse.Namespace, report: dict, config, dataset) -> None:
    metadata, ks, split = dataset.metadata, args.ks, config.trainer_config.split
    print(f"{metadata.name}, split {split} ({args.subset}, {len(dataset):,} targets), exclude {args.exclude}, "
          f"ranking over all {metadata.num_movies:,} movies; [95% bootstrap interval over users]")
    print(f"the model's time: {config.model_config.time_use}" + (
        " (it reads each target's timestamp: the moment the recommendation is asked for)"
        if config.model_config.query_time else ""))
    print(metrics_table(report["results"], ks, report["intervals"], METRICS if args.all_metrics else HEADLINE))
    print("One target per user: MAP@K equals MRR@K and Recall@K equals HR@K"
          + ("." if args.all_metrics else "; --all-metrics prints them, and Precision@K and full MRR."))
    if args.against:
        print(f"\nmodel - {args.against}, paired over the same {len(dataset):,} targets:")
        print(markdown_table(["metric", "difference", "95% interval", "p-value"], [
            [metric, f"{c['difference']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]", f"{c['p_value']:.4f}"]
            for metric, c in report["paired_difference"].items()]))
    print("\nAn extra, not the protocol's metric: the targets the user rated 4-5 stars only (the leave-one-out "
          "target is every rating, liked or not):")
    print(grouped_table(report["liked_targets"], ks, args.against))
    if args.buckets:
        print("\nBy the user's number of ratings before the target, and by the target's popularity (the 10% "
              "most-rated movies of the training ratings against the rest):")
        print(grouped_table(report["buckets"], ks, args.against))
    if split == "random_windows":
        print("random_windows is the post's split: its training windows overlap the future, so "
              "these numbers are leaky.")


def write_report(args: argparse.Namespace, report: dict, config, dataset, model_ranks: torch.Tensor) -> None:
    """The plot, then the JSON report beside the checkpoint, with the model's rank of each target
    (for a later --against), each file named on a `wrote` line."""
    if args.save_predictions:
        print(f"wrote {args.save_predictions} (the model's top {max(args.ks)} per user)")
    if args.plot:
        plot_results(report["results"], args.ks, args.plot)
        print(f"wrote {args.plot}")
    out = report_path(args.checkpoint, args.subset, args.exclude, args.ks)
    text = json.dumps({"split": config.trainer_config.split, "subset": args.subset,
                       "time": config.model_config.time_use, "exclude": args.exclude, "k": list(args.ks),
                       "targets": len(dataset), "resamples": args.resamples, "against": args.against, **report,
                       "targets_of": targets_of(dataset), "model_ranks": model_ranks.tolist()}, indent=2)
    atomic_write(out, lambda tmp: tmp.write_text(text))
    print(f"wrote {out}")


def targets_of(dataset) -> dict[str, list[int]]:
    """The users and target movies of a data set, in MovieLens ids: what two reports must share to be paired."""
    metadata = dataset.metadata
    return {"users": [metadata.user_ids[u] for u in dataset.user_tokens.tolist()],
            "movies": [metadata.movie_ids[m] for m in dataset.target_tokens.tolist()]}


def ranks_of_report(path: Path, dataset, subset: str, exclude: str) -> torch.Tensor:
    """The model ranks an eval.py report holds, checked to be of the same targets (users and target
    movies, in order), subset and exclusion."""
    try:
        report = json.loads(path.read_text())
        ranks, targets = report["model_ranks"], report["targets_of"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--against {path} is not an eval.py report with the model's ranks ({type(e).__name__}: {e}); "
                        "give an eval_*.json that eval.py wrote") from None
    if (report.get("subset"), report.get("exclude")) != (subset, exclude) or targets != targets_of(dataset):
        raise UserError(f"--against {path} ranks other targets (subset {report.get('subset')}, exclude "
                        f"{report.get('exclude')}, {len(targets.get('users', []))} targets); the paired difference needs "
                        f"the same {len(dataset):,} targets of --subset {subset} --exclude {exclude}")
    return torch.tensor(ranks)


def other_checkpoint_scorer(path: Path, dataset, data, data_dir: str) -> Scorer:
    """The scorer of another checkpoint's model on the same targets (its own context length)."""
    other, other_config, other_metadata = model_from_checkpoint(load_checkpoint(path))
    check_same_data(other_metadata, dataset.metadata, f"--against {path}", data_dir)
    theirs = make_datasets(other_config, data)[dataset.subset].to(dataset.device)
    same_targets = torch.equal(theirs.target_tokens, dataset.target_tokens)
    if other_config.trainer_config.split != dataset.split or not same_targets:
        raise UserError(f"--against {path} uses another split ({other_config.trainer_config.split}); "
                        "the paired difference needs the same targets")
    scorer = model_scorer(other.to(dataset.device))
    c = other_config.model_config.transformer_config.context_window_size
    return lambda batch: scorer(with_context(batch, dataset.device_data, c))


if __name__ == "__main__":
    sys.exit(run_script(main))
