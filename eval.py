"""Evaluate a checkpoint, or another system's top-K lists, against popularity baselines:
python eval.py --checkpoint PATH   or   python eval.py --predictions FILE.csv [--config YAML]

Every scorer ranks all movies for each target with the movies the user rated before it removed
(`--exclude window` removes only the input window, as the post did). One target per user and
split, so MAP@K equals MRR@K and Recall@K equals HR@K; Precision@K is HR@K / K. Prints HR, NDCG
and MRR at each K (--all-metrics: every metric), then what the top-K lists hold beyond accuracy
(beyond_accuracy.py), and writes every metric as JSON beside the checkpoint (or the CSV), named by
subset, exclusion, K and popularity penalty, with the ranks of each target, so that a later
--against can pair with it when its checkpoint is gone. A later call with other options adds to
that JSON: --against, --buckets and --penalty-sweep keep each other's results.
"""
from __future__ import annotations

import errors  # before the libraries: Ctrl-C while they load is one line
errors.quiet_while_loading()

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from beyond_accuracy import CATALOG, PER_USER, Catalog, catalog_of, list_metrics
from build import make_datasets, pick_device
from checkpoint import check_same_data, data_for_checkpoint, load_checkpoint, model_from_checkpoint
from config import DEFAULT_CONFIG, load_config
from data import EXCLUDE, load_movielens, with_context
from errors import UserError, argument_parser, out_of_memory, run_script
from files import atomic_write, refuse_to_overwrite
from predictions import read_lists, write_lists
from ranking import (HEADLINE, METRICS, Scorer, bootstrap_intervals, constant_scorer, grouped_metrics, grouped_table,
                     liked_targets, markdown_table, metrics_table, model_scorer, paired_difference, penalized,
                     per_user_metrics, popularity_baselines, popularity_penalty, rank_all, scored_batches, target_groups,
                     target_ranks, top_tokens)
from releases import ensure_movielens
from run import checkpoint_of, inputs_of, report_path


MAX_RESAMPLES = 100_000  # about two minutes a table of ML-1M users on 2 CPU cores
Ranked = dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]  # scorer -> (ranks, top-K lists or None)


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    args = parse_arguments(argv)
    try:
        return evaluate(args)
    except (RuntimeError, MemoryError) as e:
        raise out_of_memory(e, pick_device(args.device), f"lower --batch-size ({args.batch_size})") or e from None


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Load, rank, summarize, print, write: eval.py's stages."""
    model, config, data = load_inputs(args)
    check_outputs(args, config, data.metadata)
    dataset = make_datasets(config, data)[args.subset].to(pick_device(args.device))
    catalog = catalog_of(dataset)
    scorers, reported = make_scorers(args, model, dataset, data, config.trainer_config.data_dir)
    ranked = rank_every_scorer(args, scorers, dataset)
    if reported is not None:
        ranked[args.against] = (reported, None)
    report = summarize(args, ranked, dataset, catalog)
    if args.penalty_sweep:
        report["penalty_sweep"] = penalty_sweep(args, model_scorer(model.to(dataset.device)), dataset, catalog)
    print_report(args, report, config, dataset)
    write_report(args, report, config, dataset, ranked[args.name][0])
    return report["results"]


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ranked = parser.add_mutually_exclusive_group(required=True)
    ranked.add_argument("--checkpoint", type=Path, help="a run's folder (its best.pt), best.pt or last.pt")
    ranked.add_argument("--predictions", type=Path, metavar="CSV",
                        help="another system's top-K lists, user_id,rank,item_id in MovieLens ids (rank 1 first), "
                             "scored on the same targets as a checkpoint")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="with --predictions: the config whose data_dir and split define the targets "
                             f"(default: {DEFAULT_CONFIG.name})")
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
                             "or top-rated-popular: the paired difference to it per metric, with its interval "
                             "and p-value")
    parser.add_argument("--buckets", action="store_true",
                        help="each metric by the user's number of ratings before the target and by the target's "
                             "popularity, with intervals (and --against's paired difference)")
    parser.add_argument("--popularity-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="rank by the model's score less LAMBDA x log(1 + the movie's training ratings) "
                             "(default 0: off); more LAMBDA, more of the long tail")
    parser.add_argument("--penalty-sweep", type=float, nargs="+", metavar="LAMBDA",
                        help="rank again with each popularity penalty: NDCG and HR against coverage, long-tail "
                             "share and novelty at the largest K")
    parser.add_argument("--sweep-plot", type=Path, metavar="PNG", help="draw --penalty-sweep here")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples over users (1,000 take about a second for ML-1M's 6,040 users "
                             f"on 2 CPU cores; at most {MAX_RESAMPLES:,})")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's, or --config's)")
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
    penalties = [args.popularity_penalty, *(args.penalty_sweep or [])]
    if args.predictions and (any(penalties) or args.penalty_sweep or args.save_predictions):
        parser.error("--popularity-penalty, --penalty-sweep and --save-predictions rank with a model: give --checkpoint")
    if not all(map(torch.isfinite, torch.tensor(penalties))):
        parser.error("every popularity penalty must be a finite number")
    if args.sweep_plot and not args.penalty_sweep:
        parser.error("--sweep-plot draws --penalty-sweep: give both")
    args.checkpoint = args.checkpoint and checkpoint_of(args.checkpoint)
    args.ks = tuple(sorted(args.k))
    args.name = "predictions" if args.predictions else "model"  # the ranked system's row
    return args


def load_inputs(args: argparse.Namespace):
    """(the checkpoint's model or None, the config that defines the targets, the data)."""
    if args.checkpoint:
        model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint), str(args.checkpoint))
        return model, config, data_for_checkpoint(config, metadata, args.data_dir)
    config = load_config(args.config, [f"trainer_config.data_dir={args.data_dir}"] if args.data_dir else [])
    tc = config.trainer_config
    return None, config, load_movielens(ensure_movielens(tc.data_dir), cache=tc.cache)


def check_outputs(args: argparse.Namespace, config, metadata) -> None:
    """Refuse, before any ranking, outputs that would overwrite the run or the data, and a K
    larger than the catalog."""
    inputs = inputs_of(args.checkpoint or args.predictions, args.data_dir or config.trainer_config.data_dir)
    for option in ("save_predictions", "plot", "sweep_plot"):
        refuse_to_overwrite(getattr(args, option), "--" + option.replace("_", "-"), inputs)
    if max(args.ks) > metadata.num_movies:
        raise UserError(f"--k {max(args.ks)} is more than the {metadata.num_movies:,} movies of {metadata.name}; "
                        f"give K of at most {metadata.num_movies:,}")


def make_scorers(args: argparse.Namespace, model, dataset, data,
                 data_dir: str) -> tuple[dict[str, Scorer], Optional[torch.Tensor]]:
    """The model (with its popularity penalty) or the predictions' lists, both popularity
    baselines and --against's checkpoint; or --against's report's ranks, read (and checked)
    before any ranking."""
    baselines = popularity_baselines(dataset)
    first = (predictions_scorer(args, dataset) if args.predictions else
             penalized(model_scorer(model.to(dataset.device)), baselines["most-rated"], args.popularity_penalty))
    scorers = {args.name: first, **{name: constant_scorer(s) for name, s in baselines.items()}}
    if args.against and args.against.endswith(".json"):
        return scorers, ranks_of_report(Path(args.against), dataset, args.subset, args.exclude)
    if args.against and args.against not in scorers:
        scorers[args.against] = other_checkpoint_scorer(Path(args.against), dataset, data, data_dir)
    return scorers, None


def predictions_scorer(args: argparse.Namespace, dataset) -> Scorer:
    """The lists of --predictions as scores, in list order: ranking them reads the list (excluded
    movies drop out as for a model). Unlisted movies score NaN, which ranking.target_ranks counts
    as a miss wherever the list ends."""
    if len(dataset.user_tokens.unique()) != len(dataset):
        raise UserError(f"--predictions scores one list per user; split {dataset.split} has several targets per "
                        "user: give a config with split leave_one_out")
    lists = read_lists(args.predictions, dataset.metadata)
    if lists.shape[1] < max(args.ks):
        raise UserError(f"--k {max(args.ks)} is longer than the lists of {args.predictions} (at most {lists.shape[1]} "
                        f"items a user); give --k {lists.shape[1]} or less")
    missing = int((lists[dataset.user_tokens.cpu(), 0] < 0).sum())
    if missing:
        print(f"note: {missing:,} of the {len(dataset):,} users have no list in {args.predictions}: each of their "
              "targets counts as a miss")
    vocab, width = dataset.metadata.vocab_size, lists.shape[1]
    listed = lists.to(dataset.device)
    place_scores = torch.arange(width, 0, -1, dtype=torch.float32, device=dataset.device)  # rank 1 highest

    def scores(batch) -> torch.Tensor:
        rows = listed[batch.user_tokens]
        out = torch.full((len(rows), vocab + 1), float("nan"), device=rows.device)  # column vocab: -1's sink
        out.scatter_(1, rows.masked_fill(rows < 0, vocab), place_scores.expand_as(rows))
        return out[:, :vocab]
    return scores


def rank_every_scorer(args: argparse.Namespace, scorers: dict[str, Scorer], dataset) -> Ranked:
    """Each scorer's rank of every target and its top-K lists; the model's written to
    --save-predictions."""
    ranked = {name: rank_all(scorer, dataset, args.exclude, args.batch_size, max(args.ks)) for name, scorer in scorers.items()}
    if args.save_predictions:
        write_lists(args.save_predictions, dataset.user_tokens, ranked[args.name][1], dataset.metadata)
    return ranked


def summarize(args: argparse.Namespace, ranked: Ranked, dataset, catalog: Catalog) -> dict:
    """Every metric per scorer with its interval (the catalog metrics without), --against's
    paired difference, and the metrics of the liked targets and (--buckets) of each group of
    targets."""
    per_user, whole = {}, {}
    targets = dataset.target_tokens.cpu()
    for name, (ranks, lists) in ranked.items():
        per_user[name] = per_user_metrics(ranks, args.ks, full_mrr=not args.predictions)
        if lists is not None:
            mine, whole[name] = list_metrics(lists, targets, catalog, args.ks)
            per_user[name].update(mine)
    pair = (args.name, args.against) if args.against else None
    return {"results": {name: {**{metric: v.mean().item() for metric, v in values.items()}, **whole.get(name, {})}
                        for name, values in per_user.items()},
            "intervals": {name: bootstrap_intervals(values, args.resamples) for name, values in per_user.items()},
            "paired_difference": ({args.against: paired_difference(per_user[args.name], per_user[args.against],
                                                                   args.resamples)} if args.against else {}),
            "liked_targets": grouped_metrics(per_user, liked_targets(dataset), args.resamples, pair),
            "buckets": grouped_metrics(per_user, target_groups(dataset), args.resamples, pair) if args.buckets else None}


@torch.inference_mode()
def penalty_sweep(args: argparse.Namespace, scorer: Scorer, dataset, catalog: Catalog) -> list[dict[str, float]]:
    """Per popularity penalty (penalized's), the model's accuracy and what its lists cover, at the
    largest K; the model scores each batch once for every penalty."""
    k, strengths = max(args.ks), sorted(set(args.penalty_sweep))
    penalties = [popularity_penalty(catalog.count, strength).to(dataset.device) for strength in strengths]
    found = [([], []) for _ in strengths]  # per penalty: ranks and lists, batch by batch
    for batch, excluded, scores in scored_batches(scorer, dataset, args.exclude, args.batch_size):
        for penalty, (ranks, lists) in zip(penalties, found):
            shifted = scores - penalty
            ranks.append(target_ranks(shifted, batch.target_tokens, excluded).cpu())
            lists.append(top_tokens(shifted, excluded, k).cpu())
    rows, targets = [], dataset.target_tokens.cpu()
    for strength, (ranks, lists) in zip(strengths, found):
        per_user, whole = list_metrics(torch.cat(lists), targets, catalog, (k,))
        accuracy = per_user_metrics(torch.cat(ranks), (k,))
        rows.append({"penalty": strength, **{m: accuracy[f"{m}@{k}"].mean().item() for m in ("ndcg", "hr")},
                     "coverage": whole[f"coverage@{k}"],
                     **{m: per_user[f"{m}@{k}"].mean().item() for m in ("long-tail", "novelty")}})
    return rows


def print_report(args: argparse.Namespace, report: dict, config, dataset) -> None:
    """The accuracy table first, then what the lists hold, --against's paired difference, the liked
    targets, --buckets and --penalty-sweep."""
    metadata, ks, split = dataset.metadata, args.ks, config.trainer_config.split
    print(f"{metadata.name}, split {split} ({args.subset}, {len(dataset):,} targets), exclude {args.exclude}, "
          f"ranking over all {metadata.num_movies:,} movies; [95% bootstrap interval over users]")
    if args.predictions:
        print(f"predictions: the lists of {args.predictions}; full MRR is left out (a list's end hides the ranks "
              "beyond it)")
    else:
        print(f"the model's time: {config.model_config.time_use}" + (
            " (it reads each target's timestamp: the moment the recommendation is asked for)"
            if config.model_config.query_time else "") + (
            f"; popularity penalty {args.popularity_penalty:g}" if args.popularity_penalty else ""))
    print(metrics_table(report["results"], ks, report["intervals"], METRICS if args.all_metrics else HEADLINE))
    print("One target per user: MAP@K equals MRR@K and Recall@K equals HR@K"
          + ("." if args.all_metrics else "; --all-metrics prints them, and Precision@K and full MRR."))
    print(f"\nBeyond accuracy, the top {max(ks)} lists (beyond_accuracy.py; the JSON has every K and the intervals):")
    print(beyond_table(report["results"], max(ks)))
    if args.against:
        print(f"\n{args.name} - {args.against}, paired over the same {len(dataset):,} targets:")
        print(markdown_table(["metric", "difference", "95% interval", "p-value"], [
            [metric, f"{c['difference']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]", f"{c['p_value']:.4f}"]
            for metric, c in report["paired_difference"][args.against].items()]))
    print("\nAn extra, not the protocol's metric: the targets the user rated 4-5 stars only (the leave-one-out "
          "target is every rating, liked or not):")
    print(grouped_table(report["liked_targets"], ks, args.against))
    if args.buckets:
        print("\nBy the user's number of ratings before the target, and by the target's popularity (the 10% "
              "most-rated movies of the training ratings against the rest):")
        print(grouped_table(report["buckets"], ks, args.against))
    if args.penalty_sweep:
        print(f"\nThe model with a popularity penalty (score - LAMBDA x log(1 + training ratings)), at K {max(ks)}:")
        print(markdown_table(list(report["penalty_sweep"][0]),
                             [[f"{v:g}" if m == "penalty" else f"{v:.4f}" for m, v in row.items()]
                              for row in report["penalty_sweep"]]))
    if split == "random_windows":
        print("random_windows is the post's split: its training windows overlap the future, so "
              "these numbers are leaky.")


def beyond_table(results: dict[str, dict[str, float]], k: int) -> str:
    """One row per ranked list, a column per beyond-accuracy metric at K (popularity: mean
    training ratings of a listed movie; novelty in bits)."""
    columns = [f"{m}@{k}" for m in (*CATALOG, *PER_USER)]
    return markdown_table(["scorer", *columns], [
        [name, *(f"{values[c]:.0f}" if c.startswith("popularity") else f"{values[c]:.4f}" for c in columns)]
        for name, values in results.items() if columns[0] in values])


def write_report(args: argparse.Namespace, report: dict, config, dataset, ranks: torch.Tensor) -> None:
    """The plots, then the JSON report beside the checkpoint (or the CSV), with the ranked
    system's rank of each target (for a later --against), each file named on a `wrote` line."""
    if args.save_predictions:
        print(f"wrote {args.save_predictions} (the model's top {max(args.ks)} per user)")
    if args.plot or args.sweep_plot:
        from plots import plot_penalty_sweep, plot_results  # here: matplotlib's second of loading only when drawn
    if args.plot:
        plot_results(report["results"], args.ks, args.plot)
        print(f"wrote {args.plot}")
    if args.sweep_plot:
        plot_penalty_sweep(report["penalty_sweep"], report["results"], max(args.ks), args.sweep_plot)
        print(f"wrote {args.sweep_plot}")
    out = report_path(args.checkpoint or args.predictions, args.subset, args.exclude, args.ks, args.popularity_penalty)
    fresh = {"split": config.trainer_config.split, "subset": args.subset,
             "time": None if args.predictions else config.model_config.time_use, "exclude": args.exclude,
             "k": list(args.ks), "popularity_penalty": args.popularity_penalty, "targets": len(dataset),
             "resamples": args.resamples, **report, "targets_of": targets_of(dataset), "model_ranks": ranks.tolist()}
    text = json.dumps(merged_report(out, fresh), indent=2)
    atomic_write(out, lambda tmp: tmp.write_text(text), "the tables above are complete, the report is not saved "
                 "(copy the run folder somewhere writable to keep it)")
    print(f"wrote {out}")


def merged_report(path: Path, fresh: dict) -> dict:
    """fresh, keeping from the report already at path what this call did not compute (paired
    differences to others, buckets, the penalty sweep) when both rank the same targets alike."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    if not isinstance(old, dict) or any(old.get(key) != fresh[key] for key in ("model_ranks", "targets_of", "resamples")):
        return fresh
    pairs = old.get("paired_difference") if isinstance(old.get("paired_difference"), dict) else {}
    kept = {against: pair for against, pair in pairs.items()
            if isinstance(pair, dict) and all(isinstance(c, dict) and "difference" in c for c in pair.values())}
    fresh["paired_difference"] = {**kept, **fresh["paired_difference"]}
    for section in ("buckets", "penalty_sweep"):
        if fresh.get(section) is None:
            fresh[section] = old.get(section)
    return fresh


def targets_of(dataset) -> dict[str, list[int]]:
    """The users and target movies of a data set, in MovieLens ids: what two reports must share to be paired."""
    metadata = dataset.metadata
    return {"users": [metadata.user_ids[u] for u in dataset.user_tokens.tolist()],
            "movies": [metadata.movie_ids[m] for m in dataset.target_tokens.tolist()]}


def ranks_of_report(path: Path, dataset, subset: str, exclude: str) -> torch.Tensor:
    """The ranks an eval.py report holds, checked to be of the same targets (users and target
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
    checkpoint = checkpoint_of(path)
    other, other_config, other_metadata = model_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint))
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
