"""The beyond-accuracy metrics on small examples worked by hand, and the top-K lists they read."""
import math

import pytest
import torch

import beyond_accuracy as beyond
import ranking

# A catalog of 4 movies (tokens 0-3; 4 and 5 are SOS and EOS), 3 users with training ratings:
# movie 0 rated by all 3, movie 1 by 2, movies 2 and 3 by nobody. Genres over 3 names.
COUNT = torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0, 0.0])
GENRES = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
CATALOG = beyond.Catalog(count=COUNT, raters=COUNT, users=3, genres=GENRES, num_movies=4)


def test_serendipity_follows_rectools_worked_example():
    """RecTools' Serendipity docstring example, one relevant movie per user here: user 2 is shown
    [1, 2] and rates 2, a movie nobody rated before: (4 + 1 - 2) / 4 at rank 2, over a list of 2."""
    lists = torch.tensor([[0, 1], [1, 2], [1, 2], [2, -1]])
    targets = torch.tensor([0, 2, 1, 3])
    assert beyond.serendipity(lists, targets, CATALOG).tolist() == [0.0, 0.375, 0.125, 0.0]
    assert beyond.popularity_ranks(CATALOG)[:4].tolist() == [1, 2, 0, 0]  # dense, most-rated first


def test_intra_list_diversity_is_the_mean_pairwise_hamming_distance_of_genres():
    lists = torch.tensor([[0, 1, 2], [0, 3, -1], [0, -1, -1], [2, 2, -1]])
    # [0, 1, 2]: d(0,1) = 2, d(0,2) = 1, d(1,2) = 1 -> 4/3; [0, 3]: 2; one movie: 0; the same movie twice: 0
    assert beyond.intra_list_diversity(lists, CATALOG).tolist() == pytest.approx([4 / 3, 2.0, 0.0, 0.0])


def test_novelty_popularity_and_long_tail_of_each_list():
    lists = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    novelty = beyond.novelty(lists, CATALOG).tolist()
    # -log2(3/3) = 0 and -log2(2/3); a movie nobody rated counts as one user's: -log2(1/3); empty list: 0
    assert novelty == pytest.approx([(0 + math.log2(3 / 2)) / 2, math.log2(3), 0.0])
    assert beyond.mean_popularity(lists, CATALOG).tolist() == [2.5, 0.0, 0.0]
    # the head is the most-rated 20% of 4 movies: movie 0 alone
    assert CATALOG.head[:4].tolist() == [True, False, False, False]
    assert beyond.long_tail_share(lists, CATALOG).tolist() == [0.5, 1.0, 0.0]


def test_coverage_and_gini_index_over_the_whole_catalog():
    assert beyond.coverage(torch.tensor([[0, 1], [0, -1]]), 4) == 0.5
    # exposure counts sorted [0, 0, 2, 2]: sum (2i - 5) c_i / (4 * 4) = (1 + 3) * 2 / 16
    assert beyond.gini_index(torch.tensor([[0, 1], [0, 1]]), 4) == 0.5
    assert beyond.gini_index(torch.tensor([[0], [0]]), 4) == 0.75  # one movie takes every slot: (n - 1) / n
    assert beyond.gini_index(torch.tensor([[0, 1], [2, 3]]), 4) == 0.0  # every movie listed once: equal


def test_list_metrics_at_each_k_reads_the_first_k_of_each_list():
    lists, targets = torch.tensor([[1, 0, 3], [0, 2, 1]]), torch.tensor([3, 2])
    per_user, whole = beyond.list_metrics(lists, targets, CATALOG, (1, 3))
    assert whole == {"coverage@1": 0.5, "gini@1": pytest.approx(0.5), "coverage@3": 1.0,
                     "gini@3": pytest.approx(beyond.gini_index(lists, 4))}
    assert per_user["popularity@1"].tolist() == [2.0, 3.0]
    assert set(per_user) == {f"{m}@{k}" for m in beyond.PER_USER for k in (1, 3)}


def test_top_tokens_list_in_the_order_target_ranks_ranks():
    """Equal scores come by token, a NaN last, excluded movies never: each listed movie's place is
    the rank ranking.target_ranks gives it as a target."""
    scores = torch.tensor([[1.0, 3.0, 1.0, float("nan"), 3.0, 1.0, 0.5],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[0, 4] = excluded[1, :5] = True
    top = ranking.top_tokens(scores, excluded, 5)
    assert top.tolist() == [[1, 0, 2, 5, 6], [5, 6, -1, -1, -1]]
    for row in range(2):
        listed = top[row][top[row] >= 0]
        ranks = ranking.target_ranks(scores[row].expand(len(listed), -1), listed, excluded[row].expand(len(listed), -1))
        assert ranks.tolist() == list(range(len(listed)))
