"""Beyond accuracy: what the top-K lists users are shown hold, not only where the one target ranks.

The post's closing next steps name these: diversity, novelty, serendipity and popularity bias.
Every metric reads lists [N, K] of movie tokens (-1 where a list is shorter: fewer movies were
left after the exclusion) and what the split's training ratings say of each movie (a Catalog),
all users at once. Each follows a library's definition, named in its docstring, so that numbers
compare with RecTools' and RecBole's.

Per-user metrics (a value per list, averaged over users; eval.py gives them bootstrap intervals,
paired differences and buckets like the accuracy metrics): popularity@K, long-tail@K,
novelty@K, diversity@K, serendipity@K. Catalog metrics (one value over all lists): coverage@K,
gini@K.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from data import MovieLensSequenceDataset, movie_feature_tensors

HEAD_SHARE = 0.2  # the head: the most-rated 20% of the movies; the rest is the long tail
PER_USER = ("popularity", "long-tail", "novelty", "diversity", "serendipity")
CATALOG = ("coverage", "gini")


class Catalog(NamedTuple):
    """What the metrics know of each movie token [vocab] (SOS and EOS never listed), from the
    split's training ratings only, so that nothing of the targets leaks into them."""

    count: torch.Tensor    # float64: training ratings of the movie
    raters: torch.Tensor   # float64: users who rated it in training
    users: int             # users with a training rating
    genres: torch.Tensor   # float32 [vocab, G]: multi-hot genres
    num_movies: int        # the movies that could be listed

    @property
    def head(self) -> torch.Tensor:
        """Bool [vocab]: the HEAD_SHARE most-rated movies (ties by token), the short head."""
        order = torch.sort(self.count[:self.num_movies], descending=True, stable=True).indices
        head = torch.zeros_like(self.count, dtype=torch.bool)
        head[order[:round(HEAD_SHARE * self.num_movies)]] = True
        return head


def catalog_of(dataset: MovieLensSequenceDataset) -> Catalog:
    """The Catalog of a data set's split (any subset of it)."""
    popularity = dataset.training_popularity()
    genres, _ = movie_feature_tensors(dataset.metadata)
    return Catalog(popularity.count, popularity.raters, popularity.users, genres, dataset.metadata.num_movies)


def listed(lists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with -1 replaced by 0 for gathering, bool mask of the real entries)."""
    present = lists >= 0
    return lists.clamp(min=0), present


def list_mean(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Each row's mean over its real entries (0 for an empty list), float64 [N]."""
    values = torch.where(present, values.double(), 0.0)
    return values.sum(1) / present.sum(1).clamp(min=1)


def coverage(lists: torch.Tensor, num_movies: int) -> float:
    """Catalog coverage: the share of the catalog's movies listed to anyone (RecTools
    CatalogCoverage, normalize=True; RecBole ItemCoverage)."""
    return lists[lists >= 0].unique().numel() / num_movies


def gini_index(lists: torch.Tensor, num_movies: int) -> float:
    """Gini index of exposure over the whole catalog, never-listed movies included with 0: 0 when
    every movie is listed equally often, near 1 when a few take every slot (RecBole GiniIndex:
    sum_i (2i - n - 1) c_i / (n sum c), counts c ascending, i from 1)."""
    counts = torch.bincount(lists[lists >= 0], minlength=num_movies)[:num_movies].double().sort().values
    i = torch.arange(1, num_movies + 1, dtype=torch.float64)
    return ((2 * i - num_movies - 1) * counts).sum().item() / (num_movies * counts.sum().clamp(min=1).item())


def mean_popularity(lists: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    """Average recommended popularity: the mean number of training ratings of the listed movies
    (RecTools AvgRecPopularity; RecBole AveragePopularity)."""
    tokens, present = listed(lists)
    return list_mean(catalog.count[tokens], present)


def long_tail_share(lists: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    """The share of listed movies outside the short head, the most-rated HEAD_SHARE of the movies
    (RecBole TailPercentage, with the tail set by the head's share of the catalog)."""
    tokens, present = listed(lists)
    return list_mean(~catalog.head[tokens], present)


def novelty(lists: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    """Mean self-information of the listed movies, -log2 of the share of users who rated each in
    training, in bits (RecTools MeanInvUserFreq). A movie nobody rated in training counts as rated
    by one user: the most novel, but finite."""
    tokens, present = listed(lists)
    return list_mean(-torch.log2(catalog.raters.clamp(min=1)[tokens] / catalog.users), present)


def intra_list_diversity(lists: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    """Intra-list diversity over genres: the mean Hamming distance between the multi-hot genres
    of every pair of listed movies (RecTools IntraListDiversity with
    PairwiseHammingDistanceCalculator); 0 for a list of under two movies.

    Summed genre by genre: of m listed movies, c with genre g, c (m - c) pairs differ on g; so no
    [N, K, K] distance matrix is built."""
    tokens, present = listed(lists)
    with_genre = F.embedding_bag(tokens, catalog.genres.double(), mode="sum",
                                 per_sample_weights=present.double())   # [N, G]: c per genre
    m = present.sum(1, keepdim=True).double()
    pairs = (m * (m - 1) / 2).squeeze(1)
    return (with_genre * (m - with_genre)).sum(1) / pairs.clamp(min=1)


def popularity_ranks(catalog: Catalog) -> torch.Tensor:
    """Dense rank of each token by its training ratings, 1 for the most-rated (equal counts share a
    rank), 0 for a movie nobody rated in training: RecTools' popularity rank for serendipity."""
    distinct = catalog.count[catalog.count > 0].unique()           # ascending
    above = len(distinct) - torch.searchsorted(distinct, catalog.count, right=True)
    return torch.where(catalog.count > 0, above + 1, 0).double()


def serendipity(lists: torch.Tensor, targets: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    """RecTools Serendipity: the mean over the list of max(p(i) - pu(i), 0) * rel(i), where p(i) =
    (n + 1 - i) / n for the movie at rank i, pu(i) = (n + 1 - its popularity rank) / n (0 for a
    movie nobody rated in training), n the catalog's movies and rel(i) 1 for the target. A hit
    on a movie less popular than its place in the list scores; a hit on a blockbuster does not."""
    tokens, present = listed(lists)
    n, rank = catalog.num_movies, torch.arange(1, lists.shape[1] + 1, dtype=torch.float64)
    pop_rank = popularity_ranks(catalog)[tokens]
    unexpected = torch.where(pop_rank > 0, (pop_rank - rank).clamp(min=0) / n, (n + 1 - rank) / n)
    return list_mean(unexpected * (tokens == targets[:, None]), present)


def list_metrics(lists: torch.Tensor, targets: torch.Tensor, catalog: Catalog,
                 ks: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(per-user metrics {name@K: float64 [N]}, catalog metrics {name@K: value}) of the first K of
    each list, for each K."""
    per_user, whole = {}, {}
    for k in ks:
        top = lists[:, :k]
        per_user.update({f"popularity@{k}": mean_popularity(top, catalog),
                         f"long-tail@{k}": long_tail_share(top, catalog),
                         f"novelty@{k}": novelty(top, catalog),
                         f"diversity@{k}": intra_list_diversity(top, catalog),
                         f"serendipity@{k}": serendipity(top, targets, catalog)})
        whole.update({f"coverage@{k}": coverage(top, catalog.num_movies),
                      f"gini@{k}": gini_index(top, catalog.num_movies)})
    return per_user, whole
