"""Ranking and metrics: every scorer ranks all movies for each target, the movies the user rated
before it removed (or, as the post did, only those of the input window).

A scorer maps a data.WindowBatch to [B, vocab] scores: the model's logits (model_scorer) or one score
vector for every user (the popularity baselines). One target per row, so MAP@K equals MRR@K and
Recall@K equals HR@K; Precision@K is HR@K / K.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional

import torch

from data import WindowBatch, MovieLensSequenceDataset

METRICS = ("hr", "ndcg", "mrr", "map", "precision", "recall")
HEADLINE = ("hr", "ndcg", "mrr")  # one target per user: MAP@K is MRR@K, Recall@K is HR@K, Precision@K HR@K / K
Scorer = Callable[[WindowBatch], torch.Tensor]


def model_scorer(model: torch.nn.Module, compiled: bool = False) -> Scorer:
    """The model's logits in float32.

    compiled: through torch.compile, with any batch size. It costs seconds of compilation once
    and pays off where evaluation repeats, as in training's validation every epoch."""
    scorer = lambda batch: model(batch).float()
    return torch.compile(scorer, dynamic=True) if compiled else scorer


def constant_scorer(scores: torch.Tensor) -> Scorer:
    """The same score vector for every target (a popularity baseline)."""
    return lambda batch: scores.to(batch.user_tokens.device).expand(len(batch.user_tokens), -1)


def popularity_baselines(dataset: MovieLensSequenceDataset) -> dict[str, torch.Tensor]:
    """Token-space score vectors from the split's training interactions only (any subset of
    the split may be passed).

    most-rated: the number of training ratings. top-rated-popular: the post's baseline, the
    highest mean rating among the 5% most-rated movies, those first, the rest by count.
    """
    count, mean_rating, *_ = dataset.training_popularity()
    top = count >= torch.quantile(count[count > 0], 0.95)
    top_rated = torch.where(top, 10.0 + mean_rating, count / count.max())
    return {"most-rated": count.float(), "top-rated-popular": top_rated.float()}


def target_ranks(scores: torch.Tensor, target_tokens: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the non-excluded tokens (excluded: bool, or its uint8 view).

    Ties are broken by token index, so equal scores (popularity counts) are ranked as a stable
    sort would rank them, not in the target's favour. A NaN score ranks below every number: a
    target whose score is NaN is a miss, never first.
    """
    excluded = excluded.view(torch.uint8)  # the same bytes, which inductor's kernels load faster than bool
    target_score = scores.gather(1, target_tokens[:, None])
    missed = target_score[:, 0].isnan()  # a NaN elsewhere is neither > nor == the target's score: never ahead
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_score) | ((scores == target_score) & (index < target_tokens[:, None]))
    rank = (ahead & (excluded == 0)).sum(1)
    # a target the exclusion removed (a repeat of a seen movie) counts as a miss
    missed |= excluded.gather(1, target_tokens[:, None])[:, 0] != 0
    return torch.where(missed, scores.shape[1], rank)


Ranker = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ranker(compiled: bool) -> Ranker:
    """target_ranks, or when compiled one fused pass over the scores instead of one per operation."""
    return compiled_target_ranks() if compiled else target_ranks


@functools.cache
def compiled_target_ranks() -> Ranker:
    ranks = torch.compile(target_ranks, dynamic=True)
    # viewed outside the graph: inside it, inductor turns the bool-to-uint8 view into a copy
    return lambda scores, target_tokens, excluded: ranks(scores, target_tokens, excluded.view(torch.uint8))


def per_user_metrics(ranks: torch.Tensor, ks: tuple[int, ...], full_mrr: bool = True) -> dict[str, torch.Tensor]:
    """Each target's HR, NDCG, MRR, MAP, Precision and Recall at each K and (full_mrr) full MRR
    (float64 [N]): the metrics are their means. Full MRR needs every rank, which a top-K list lacks."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = (ranks < k).double()
        rr = torch.where(ranks < k, 1.0 / (ranks + 1), 0.0)
        out.update({f"hr@{k}": hit, f"ndcg@{k}": torch.where(ranks < k, 1.0 / torch.log2(ranks + 2), 0.0),
                    f"mrr@{k}": rr, f"map@{k}": rr, f"precision@{k}": hit / k, f"recall@{k}": hit})
    if full_mrr:
        out["mrr"] = 1.0 / (ranks + 1)
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """HR, NDCG, MRR, MAP, Precision and Recall at each K for one target per row, plus full MRR."""
    return {name: values.mean().item() for name, values in per_user_metrics(ranks, ks).items()}


def resampled_means(values: torch.Tensor, resamples: int, seed: int, chunk: int = 50) -> torch.Tensor:
    """[resamples, M]: the column means of values [N, M] over rows drawn N times with replacement,
    as counts per row (one matrix product a chunk of resamples, no per-resample loop over rows)."""
    n, generator, means = len(values), torch.Generator().manual_seed(seed), []
    for start in range(0, resamples, chunk):
        draws = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        counts = torch.zeros(len(draws), n, dtype=values.dtype).scatter_add_(1, draws, torch.ones_like(draws, dtype=values.dtype))
        means.append(counts @ values / n)
    return torch.cat(means)


def percentile_interval(means: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (low, high) quantiles of resampled means [resamples, M] that hold `level` between them."""
    return torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype), dim=0)


def bootstrap_intervals(values: dict[str, torch.Tensor], resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric's mean over users (per_user_metrics' values)."""
    low, high = percentile_interval(resampled_means(torch.stack(list(values.values()), 1), resamples, seed), level)
    return {name: (low[i].item(), high[i].item()) for i, name in enumerate(values)}


def paired_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict[str, float]]:
    """Per metric both have, the mean of a - b over the same targets, its bootstrap interval, and
    the two-sided p-value of a sign-flip (paired permutation) test of no difference."""
    names = [name for name in a if name in b]
    diff = torch.stack([a[name] - b[name] for name in names], 1)
    low, high = percentile_interval(resampled_means(diff, resamples, seed), level)
    observed = diff.mean(0).abs()
    generator, extreme = torch.Generator().manual_seed(seed + 1), torch.zeros(diff.shape[1])
    for start in range(0, resamples, 50):
        signs = torch.randint(0, 2, (min(50, resamples - start), len(diff)), generator=generator).double() * 2 - 1
        extreme += ((signs @ diff / len(diff)).abs() >= observed - 1e-12).sum(0)
    return {name: {"difference": diff[:, i].mean().item(), "low": low[i].item(), "high": high[i].item(),
                   "p_value": (extreme[i].item() + 1) / (resamples + 1)} for i, name in enumerate(names)}


def target_groups(dataset: MovieLensSequenceDataset) -> dict[str, torch.Tensor]:
    """Named subsets of the targets (bool [N] each), to see for whom a model gains: by how many
    movies the user rated before the target, and by the target movie's popularity (whether it is
    among the 10% most-rated movies of the training ratings)."""
    history = dataset.history_length.cpu()
    count = dataset.training_popularity().count
    popular = (count >= torch.quantile(count[count > 0], 0.9))[dataset.target_tokens.cpu()]
    return {"<= 20 ratings": history <= 20, "21-100 ratings": (history > 20) & (history <= 100),
            "> 100 ratings": history > 100, "target among the 10% most-rated movies": popular,
            "target among the other movies": ~popular}


def liked_targets(dataset: MovieLensSequenceDataset) -> dict[str, torch.Tensor]:
    """The targets the user rated 4 or 5 stars (the leave-one-out target is every rating, liked or not)."""
    return {"targets rated 4-5 stars": dataset.target_ratings.cpu() >= 4}


def grouped_metrics(per_user: dict[str, dict[str, torch.Tensor]], groups: dict[str, torch.Tensor],
                    resamples: int, pair: Optional[tuple[str, str]] = None) -> dict[str, dict]:
    """Per group: its number of targets, each scorer's mean metrics and bootstrap intervals over
    the group's targets, and with pair (ranked, against) the paired difference of the two."""
    out = {}
    for group, keep in groups.items():
        mine = {name: {metric: v[keep] for metric, v in values.items()} for name, values in per_user.items()}
        entry = {"targets": int(keep.sum())}
        if entry["targets"]:
            entry["results"] = {name: {m: v.mean().item() for m, v in values.items()} for name, values in mine.items()}
            entry["intervals"] = {name: bootstrap_intervals(values, resamples) for name, values in mine.items()}
            if pair:
                entry["paired_difference"] = {pair[1]: paired_difference(mine[pair[0]], mine[pair[1]], resamples)}
        out[group] = entry
    return out


def grouped_table(grouped: dict[str, dict], ks: tuple[int, ...], against: Optional[str] = None) -> str:
    """grouped_metrics as one table: a row per group and scorer, HR, NDCG and MRR at the largest K
    with their intervals, and the paired difference in NDCG with `against` (the JSON has every K)."""
    columns = [f"{m}@{max(ks)}" for m in HEADLINE]
    names = next((list(entry["results"]) for entry in grouped.values() if "results" in entry), [])  # ranked first
    paired = f"{names[0]} - {against}, ndcg@{max(ks)}" if against and names else None
    rows = []
    for group, entry in grouped.items():
        for name, metrics in entry.get("results", {}).items():
            cells = [f"{metrics[c]:.4f} [{entry['intervals'][name][c][0]:.4f}, {entry['intervals'][name][c][1]:.4f}]"
                     for c in columns]
            if paired:
                cells.append(signed(entry["paired_difference"][against][f"ndcg@{max(ks)}"]) if name == names[0] else "")
            rows.append([group, f"{entry['targets']:,}", name, *cells])
    return markdown_table(["group", "targets", "scorer", *columns, *([paired] if paired else [])], rows)


def signed(difference: dict[str, float]) -> str:
    """A paired difference as `+0.0123 [-0.0010, +0.0250], p 0.031`."""
    return (f"{difference['difference']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}], "
            f"p {difference['p_value']:.3f}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """The one table writer: a markdown table of these cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def top_tokens(scores: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """The k best non-excluded tokens of each row, best first, ordered as target_ranks ranks them
    (equal scores by token, a NaN below every number), -1 where fewer than k are left.

    topk leaves the order of equal scores open; only the rows with a tie among their first k + 1
    (rare for a model's logits) are sorted, stably, to settle it."""
    scores = scores.nan_to_num(nan=float("-inf")).masked_fill(excluded, float("-inf"))
    best = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    values, tokens = best.values[:, :k], best.indices[:, :k]
    tied = ((best.values[:, 1:] == best.values[:, :-1]) & (best.values[:, 1:] > float("-inf"))).any(1)
    if tied.any():
        settled = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied], tokens[tied] = settled.values[:, :k], settled.indices[:, :k]
    return tokens.masked_fill(values == float("-inf"), -1)


def scored_batches(scorer: Scorer, dataset: MovieLensSequenceDataset, exclude: str = "history",
                   batch_size: int = 1024) -> Iterator[tuple[WindowBatch, torch.Tensor, torch.Tensor]]:
    """Each batch of targets with its excluded movies and its scores [B, vocab]: only one batch's
    scores exist at a time."""
    for batch in dataset.batches(batch_size):
        yield batch, dataset.seen_mask(batch, exclude), scorer(batch)


@torch.inference_mode()
def rank_all(scorer: Scorer, dataset: MovieLensSequenceDataset, exclude: str = "history",
             batch_size: int = 1024, top: int = 0, compiled: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ranks of every target in dataset, and with top > 0 each target's list of the top-`top`
    tokens (top_tokens); compiled: ranked in one fused pass a batch."""
    rank = ranker(compiled)
    ranks, tops = [], []
    for batch, excluded, scores in scored_batches(scorer, dataset, exclude, batch_size):
        ranks.append(rank(scores, batch.target_tokens, excluded))
        if top:
            tops.append(top_tokens(scores, excluded, top).cpu())
    return torch.cat(ranks).cpu(), (torch.cat(tops) if tops else None)


def popularity_penalty(count: torch.Tensor, strength: float) -> torch.Tensor:
    """What a popularity penalty takes from each movie's score [vocab]: `strength` times log(1 +
    its ratings), trading accuracy for coverage of the long tail at ranking time."""
    return strength * torch.log1p(count.float())


def penalized(scorer: Scorer, count: torch.Tensor, strength: float) -> Scorer:
    """The scorer less its popularity penalty (0: the scorer)."""
    if not strength:
        return scorer
    penalty = popularity_penalty(count, strength)
    return lambda batch: scorer(batch) - penalty.to(batch.user_tokens.device)


def metrics_table(results: dict[str, dict[str, float]], ks: tuple[int, ...],
                  intervals: Optional[dict[str, dict[str, tuple[float, float]]]] = None,
                  metrics: tuple[str, ...] = METRICS) -> str:
    """One row a scorer, one column a metric at each K (and full MRR with every metric); `value
    [low, high]` where intervals are given."""
    full_mrr = metrics == METRICS and all("mrr" in values for values in results.values())
    columns = [f"{m}@{k}" for k in ks for m in metrics] + (["mrr"] if full_mrr else [])
    return markdown_table(["scorer", *columns], [
        [name, *(f"{values[c]:.4f}" + (" [{:.4f}, {:.4f}]".format(*intervals[name][c]) if intervals else "")
                 for c in columns)] for name, values in results.items()])
