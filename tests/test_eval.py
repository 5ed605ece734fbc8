import math

import numpy as np
import pytest
import torch

import data
import releases
import ranking as evaluation
from build import build_model
from config import load_config
from conftest import SMALL_MODEL


def test_ranks_exclude_and_break_ties_by_token():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [1.0, 1.0, 1.0, 1.0]])
    excluded = torch.tensor([[True, False, False, False], [False, False, False, False]])
    ranks = evaluation.target_ranks(scores, torch.tensor([1, 2]), excluded)
    assert ranks.tolist() == [1, 2]  # 0.9 is excluded; ties: tokens 0 and 1 come first
    miss = evaluation.target_ranks(scores, torch.tensor([0, 0]), excluded)
    assert miss[0] == 4


def test_metrics_by_hand():
    m = evaluation.metrics_from_ranks(torch.tensor([0, 2, 5, 20]), ks=(3, 10))
    assert m["hr@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 4) == m["map@3"]
    assert m["precision@3"] == pytest.approx(0.5 / 3) and m["recall@3"] == m["hr@3"]
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 21) / 4)


def test_ndcg_matches_sklearn():
    from sklearn.metrics import ndcg_score  # here, not at the top: 2 s of every worker's start
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 30))
    targets = rng.integers(0, 30, size=200)
    relevance = np.zeros_like(scores)
    relevance[np.arange(200), targets] = 1
    ranks = evaluation.target_ranks(torch.tensor(scores), torch.tensor(targets),
                                    torch.zeros(200, 30, dtype=torch.bool))
    for k in (3, 5, 10):
        ours = evaluation.metrics_from_ranks(ranks, (k,))[f"ndcg@{k}"]
        assert ours == pytest.approx(ndcg_score(relevance, scores, k=k))


def test_popularity_baselines_are_in_tokens(ml1m_dir):
    """Regression test for the post's bug: its baseline compared raw MovieLens ids with tokens."""
    movielens = data.load_movielens(ml1m_dir)
    train = data.MovieLensSequenceDataset(movielens, "train", 5)
    baselines = evaluation.popularity_baselines(train)
    meta = movielens.metadata
    _, _, _, ratings = releases.read_movielens(ml1m_dir)
    ratings = ratings.assign(order=np.arange(len(ratings))).sort_values(["user_id", "timestamp", "order"])
    history = ratings.groupby("user_id").head(-2)  # all but each user's validation and test ratings
    counts = history.movie_id.value_counts()
    most_rated = baselines["most-rated"]
    assert most_rated.shape == (meta.vocab_size,)
    for movie_id, count in counts.items():
        assert most_rated[meta.movie_ids.index(movie_id)] == count
    assert most_rated.sum() == len(history)
    top = baselines["top-rated-popular"].argmax()
    means = history.groupby("movie_id").rating.mean()
    popular = counts[counts >= np.quantile(counts.reindex(meta.movie_ids).fillna(0)[lambda c: c > 0], 0.95)]
    assert meta.movie_ids[top] == means[popular.index].idxmax()


def test_batched_evaluation_equals_row_by_row(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    test = data.MovieLensSequenceDataset(movielens, "test", 5)
    torch.manual_seed(0)
    table = torch.randn(movielens.metadata.num_users, movielens.metadata.vocab_size)
    scorer = lambda batch: table[batch.user_tokens]
    ranks, top = evaluation.rank_all(scorer, test, batch_size=64, top=5)
    for i in range(0, len(test), 29):  # the slow way, one user at a time
        u, h = int(test.user_tokens[i]), int(test.history_length[i])
        start = int(movielens.offsets[u]) + 1
        seen = set(movielens.flat_tokens[start:start + h].tolist()) | {movielens.metadata.sos, movielens.metadata.eos}
        order = [t for t in torch.argsort(table[u], descending=True, stable=True).tolist() if t not in seen]
        assert ranks[i] == order.index(int(test.target_tokens[i]))
        assert top[i].tolist() == order[:5]


def test_compiled_ranks_equal_eager_ranks(ml1m_dir):
    """The trainer's compiled validation ranks as target_ranks does, ties included, at any batch size."""
    movielens = data.load_movielens(ml1m_dir)
    test = data.MovieLensSequenceDataset(movielens, "test", 5)
    popularity = evaluation.constant_scorer(evaluation.popularity_baselines(test)["most-rated"])  # many ties
    torch.manual_seed(0)
    model = build_model(load_config(overrides=SMALL_MODEL), movielens.metadata).eval()  # one graph, compiled quickly
    for scorer, compiled_scorer in ((popularity, popularity), (evaluation.model_scorer(model),
                                                              evaluation.model_scorer(model, compiled=True))):
        for batch_size in (64, 100):  # both leave a short last batch
            eager, _ = evaluation.rank_all(scorer, test, batch_size=batch_size)
            compiled, _ = evaluation.rank_all(compiled_scorer, test, batch_size=batch_size, compiled=True)
            assert torch.equal(eager, compiled)


def test_bootstrap_interval_matches_the_normal_approximation():
    """For a mean over 5,000 users the percentile interval is about mean +- 1.96 standard errors."""
    torch.manual_seed(0)
    values = evaluation.per_user_metrics(torch.randint(0, 40, (5000,)), (10,))
    low, high = evaluation.bootstrap_intervals(values, resamples=2000)["hr@10"]
    hits = values["hr@10"]
    half_width = 1.96 * hits.std().item() / math.sqrt(len(hits))
    assert low < hits.mean().item() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


def test_paired_difference_finds_a_real_difference_and_no_false_one():
    torch.manual_seed(0)
    ranks = torch.randint(0, 50, (3000,))
    better = torch.where(torch.rand(3000) < 0.2, torch.zeros_like(ranks), ranks)  # a fifth of the users hit first
    same = evaluation.paired_difference(evaluation.per_user_metrics(ranks, (10,)),
                                        evaluation.per_user_metrics(ranks, (10,)), resamples=500)
    assert same["ndcg@10"]["difference"] == 0 and same["ndcg@10"]["p_value"] == 1.0
    found = evaluation.paired_difference(evaluation.per_user_metrics(better, (10,)),
                                         evaluation.per_user_metrics(ranks, (10,)), resamples=500)["ndcg@10"]
    assert found["difference"] > 0 and found["low"] > 0 and found["p_value"] < 0.01
    noise = evaluation.paired_difference(evaluation.per_user_metrics(torch.randint(0, 50, (3000,)), (10,)),
                                         evaluation.per_user_metrics(ranks, (10,)), resamples=500)["ndcg@10"]
    assert noise["low"] < 0 < noise["high"] and noise["p_value"] > 0.05


def test_a_nan_score_ranks_below_every_number_and_its_target_is_a_miss():
    nan = float("nan")
    scores = torch.tensor([[nan, 1.0, 2.0, 0.5], [nan, nan, nan, nan], [3.0, nan, 1.0, 2.0]])
    none = torch.zeros(3, 4, dtype=torch.bool)
    ranks = evaluation.target_ranks(scores, torch.tensor([0, 0, 3]), none)
    assert ranks.tolist() == [4, 4, 1]  # NaN targets miss; a NaN elsewhere is not ahead of the target
