"""A synthetic MovieLens data set with sequential signal, written in the original formats."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pytest-xdist runs one worker per core (pytest.ini): one thread each, torch's and the training
# subprocesses' alike, so that workers do not oversubscribe the cores
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = ROOT.parent / "shared" / "data"
# a small model: its end-to-end runs take seconds, and its compiled graph (test_eval.py) builds quickly
SMALL_MODEL = ["model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
               "trainer_config.batch_size=256"]
# The files that take longest on a cold 2-core run, slowest first: pytest-xdist hands whole files
# to its workers in collection order (pytest.ini), so these go out first and the workers end together
# rather than one waiting for the other's last long file.
SLOWEST_FIRST = ["test_distributed.py", "test_experiments.py", "test_train_step.py", "test_crash.py",
                 "test_notebooks.py", "test_bench.py", "test_losses.py", "test_real_data.py", "test_eval.py",
                 "test_errors.py", "test_mounts.py", "test_ops.py", "test_cli.py", "test_recommend.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def synthetic_ratings(num_users: int = 300, num_movies: int = 200, seed: int = 0,
                      min_len: int = 12, max_len: int = 40) -> list[tuple[int, int, int, int]]:
    """(user_id, movie_id, rating, timestamp) rows in a shuffled file order.

    Movie ids are sparse (7, 10, 13, ...) so tokens never equal ids. Each user walks a cycle of
    movies: the next movie is the one after the current with probability 0.8, so a sequence
    model can beat popularity. Some ratings of a user share a timestamp.
    """
    rng = np.random.default_rng(seed)
    movie_ids = 7 + 3 * np.arange(num_movies)
    rows = []
    for u in range(num_users):
        n = min(int(rng.integers(min_len, max_len + 1)), num_movies)
        current = int(rng.integers(num_movies))
        seen, walk = set(), []
        while len(walk) < n:
            if current not in seen:
                seen.add(current)
                walk.append(current)
            current = (current + 1) % num_movies if rng.random() < 0.8 else int(rng.integers(num_movies))
        times = 978_300_000 + np.cumsum(rng.integers(0, 3, size=n))  # 0 gaps: same-second ties
        for m, t in zip(walk, times):
            rows.append((u + 1, int(movie_ids[m]), int(rng.integers(1, 6)), int(t)))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_ml1m(folder: Path, rows=None, num_users: int = 300, num_movies: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = synthetic_ratings(num_users, num_movies) if rows is None else rows
    genres = ["Action", "Comedy", "Drama", "Sci-Fi"]
    (folder / "users.dat").write_text("".join(f"{u + 1}::M::25::{u % 20}::0{u:04d}\n"
                                              for u in range(num_users)), encoding="ISO-8859-1")
    (folder / "movies.dat").write_text("".join(
        f"{7 + 3 * m}::Movie {m}: Caf\u00e9 ({1950 + m % 50})::{genres[m % 4]}|{genres[(m + 1) % 4]}\n"
        for m in range(num_movies)), encoding="ISO-8859-1")
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows))
    return folder


@pytest.fixture(scope="session")
def ml1m_dir(tmp_path_factory) -> Path:
    return write_ml1m(tmp_path_factory.mktemp("data") / "ml-1m")


def validation_ndcg_against_most_rated(checkpoint: Path) -> tuple[float, float]:
    """Validation NDCG@10 of a checkpoint's model and of the most-rated baseline."""
    import ranking
    from build import make_datasets
    from checkpoint import load_checkpoint, model_from_checkpoint

    model, config, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    validation = make_datasets(config)["validation"]
    most_rated = ranking.constant_scorer(ranking.popularity_baselines(validation)["most-rated"])
    return ndcg_at_10(ranking.model_scorer(model), validation), ndcg_at_10(most_rated, validation)


def ndcg_at_10(scorer, dataset) -> float:
    """NDCG@10 of a scorer over a data set's targets, ranked as training's validation ranks them."""
    import ranking

    return ranking.metrics_from_ranks(ranking.rank_all(scorer, dataset)[0], (10,))["ndcg@10"]


def window_batch(movie_tokens, user_tokens, times=None, target_times=None, ratings=None, padded: int = 0):
    """A data.WindowBatch of these windows (one target a row, unknown: token 0), `padded` positions
    of each row left padding; times default to 0, ratings to 3 stars."""
    import torch
    from data import WindowBatch

    b, t = movie_tokens.shape
    times = torch.zeros(b, t, dtype=torch.long) if times is None else times
    return WindowBatch(movie_tokens, torch.full((b, t), 3.0) if ratings is None else ratings, times, user_tokens,
                       target_tokens=torch.zeros(b, dtype=torch.long), target_ratings=torch.full((b,), 3.0),
                       target_times=times[:, -1] if target_times is None else target_times,
                       history_length=torch.full((b,), t - 1 - padded))


def chunk_batch(movie_tokens, user_tokens, times=None, next_times=None, segments=None):
    """A data.ChunkBatch of these rows, one chunk a row (segments: -1 at padding), every position
    predicting; user_tokens [R]; times default to 0."""
    import torch
    from data import ChunkBatch

    r, t = movie_tokens.shape
    times = torch.zeros(r, t, dtype=torch.long) if times is None else times
    return ChunkBatch(movie_tokens, torch.full((r, t), 3.0), times, user_tokens[:, None].expand(-1, t),
                      positions=torch.arange(t).expand(r, -1),
                      segments=torch.zeros(r, t, dtype=torch.long) if segments is None else segments,
                      predict=torch.ones(r, t, dtype=torch.bool), next_tokens=torch.zeros(r, t, dtype=torch.long),
                      next_ratings=torch.full((r, t), 3.0), next_times=times if next_times is None else next_times)
