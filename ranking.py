"""Ranking and metrics: every scorer ranks all movies for each target, the movies the user rated
before it removed (or, as the post did, only those of the input window).

A scorer maps a data.Batch to [B, vocab] scores: the model's logits (model_scorer) or one score
vector for every user (the popularity baselines). One target per row, so MAP@K equals MRR@K and
Recall@K equals HR@K; Precision@K is HR@K / K.
"""
from __future__ import annotations

import csv
import functools
from typing import Callable, Optional, TextIO

import torch

from data import Batch, DatasetMetadata, MovieLensSequenceDataset

METRICS = ("hr", "ndcg", "mrr", "map", "precision", "recall")
Scorer = Callable[[Batch], torch.Tensor]


def model_scorer(model: torch.nn.Module, compiled: bool = False) -> Scorer:
    """The model's logits in float32.

    compiled: through torch.compile, with any batch size. It costs seconds of compilation once
    and pays off where evaluation repeats, as in training's validation every epoch."""
    scorer = lambda batch: model(batch.movie_ids, batch.user_ids, batch.padding_mask).float()
    return torch.compile(scorer, dynamic=True) if compiled else scorer


def constant_scorer(scores: torch.Tensor) -> Scorer:
    """The same score vector for every target (a popularity baseline)."""
    return lambda batch: scores.to(batch.user_ids.device).expand(len(batch.user_ids), -1)


def popularity_baselines(dataset: MovieLensSequenceDataset) -> dict[str, torch.Tensor]:
    """Token-space score vectors from the split's training interactions only (any subset of
    the split may be passed).

    most-rated: the number of training ratings. top-rated-popular: the post's baseline, the
    highest mean rating among the 5% most-rated movies, those first, the rest by count.
    """
    count, mean_rating = dataset.training_popularity()
    top = count >= torch.quantile(count[count > 0], 0.95)
    top_rated = torch.where(top, 10.0 + mean_rating, count / count.max())
    return {"most-rated": count.float(), "top-rated-popular": top_rated.float()}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among the non-excluded tokens (excluded: bool, or its uint8 view).

    Ties are broken by token index, so equal scores (popularity counts) are ranked as a stable
    sort would rank them, not in the target's favour.
    """
    excluded = excluded.view(torch.uint8)  # the same bytes; compiled, bool loads made this 4x slower
    target_score = scores.gather(1, targets[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_score) | ((scores == target_score) & (index < targets[:, None]))
    rank = (ahead & (excluded == 0)).sum(1)
    # a target the exclusion removed (a repeat of a seen movie) counts as a miss
    return torch.where(excluded.gather(1, targets[:, None])[:, 0] != 0, scores.shape[1], rank)


Ranker = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ranker(compiled: bool) -> Ranker:
    """target_ranks, or when compiled one fused pass over the scores instead of one per operation."""
    return compiled_target_ranks() if compiled else target_ranks


@functools.cache
def compiled_target_ranks() -> Ranker:
    ranks = torch.compile(target_ranks, dynamic=True)
    # viewed outside the graph: inside, inductor made the bool-to-uint8 view a slow copy
    return lambda scores, targets, excluded: ranks(scores, targets, excluded.view(torch.uint8))


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """HR, NDCG, MRR, MAP, Precision and Recall at each K for one target per row, plus full MRR."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        hr = hit.double().mean().item()
        rr = torch.where(hit, 1.0 / (ranks + 1), 0.0).mean().item()
        out.update({f"hr@{k}": hr, f"ndcg@{k}": torch.where(hit, 1.0 / torch.log2(ranks + 2), 0.0).mean().item(),
                    f"mrr@{k}": rr, f"map@{k}": rr, f"precision@{k}": hr / k, f"recall@{k}": hr})
    out["mrr"] = (1.0 / (ranks + 1)).mean().item()
    return out


TopSink = Callable[[Batch, torch.Tensor], None]


@torch.inference_mode()
def rank_all(scorer: Scorer, dataset: MovieLensSequenceDataset, exclude: str = "history",
             batch_size: int = 1024, top: int = 0, compiled: bool = False,
             top_sink: Optional[TopSink] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ranks of every target in dataset, and the top-`top` tokens per target when top > 0 (-1
    where fewer than `top` movies are left after the exclusion), or, with top_sink, each batch's
    top tokens handed to it and not kept. Only one batch's scores exist at a time; compiled:
    ranked in one fused pass a batch."""
    rank = ranker(compiled)
    ranks, tops = [], []
    for batch in dataset.batches(batch_size):
        excluded = dataset.seen_mask(batch, exclude)
        scores = scorer(batch)
        ranks.append(rank(scores, batch.next_movie, excluded))
        if top:
            best = scores.masked_fill(excluded, float("-inf")).topk(top, dim=1)
            tokens = best.indices.masked_fill(best.values == float("-inf"), -1).cpu()
            top_sink(batch, tokens) if top_sink else tops.append(tokens)
    return torch.cat(ranks).cpu(), (torch.cat(tops) if tops else None)


def evaluate(scorer: Scorer, dataset: MovieLensSequenceDataset, ks: tuple[int, ...] = (3, 5, 10),
             exclude: str = "history", batch_size: int = 1024, compiled: bool = False) -> dict[str, float]:
    ranks, _ = rank_all(scorer, dataset, exclude, batch_size, compiled=compiled)
    return metrics_from_ranks(ranks, ks)


def markdown_table(results: dict[str, dict[str, float]], ks: tuple[int, ...]) -> str:
    columns = [f"{m}@{k}" for k in ks for m in METRICS] + ["mrr"]
    lines = ["| scorer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)



def prediction_writer(f: TextIO, metadata: DatasetMetadata) -> TopSink:
    """A top_sink for rank_all that writes user_id,rank,item_id rows (MovieLens ids, rank 1
    first, rank_all's -1 left out) to the open CSV file f as the batches come."""
    writer = csv.writer(f)
    writer.writerow(["user_id", "rank", "item_id"])

    def write(batch: Batch, top: torch.Tensor) -> None:
        for user, row in zip(batch.user_ids.tolist(), top.tolist()):
            writer.writerows((metadata.user_ids[user], r, metadata.movie_ids[t]) for r, t in enumerate(row, 1) if t >= 0)
    return write
