import errno
"""Tokens, time order, the cache, splits and the window and chunk data sets."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import data
import releases
from conftest import SHARED_DATA, write_ml1m


def test_ml100k_format(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"
    (folder / "u.item").write_text(f"5|Five (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
                                   f"9|Nine (1996)|01-Jan-1996||http://x|{'|'.join(['1'] + ['0'] * 18)}\n",
                                   encoding="ISO-8859-1")
    (folder / "u.data").write_text("1\t9\t4\t100\n2\t5\t3\t90\n1\t5\t5\t80\n")
    movielens = data.load_movielens(folder)
    meta = movielens.metadata
    assert meta.name == "ml-100k" and meta.movie_ids == [5, 9] and meta.vocab_size == 4
    assert meta.genres == ["Action|Comedy", "unknown"]
    assert movielens.flat_tokens.tolist() == [2, 0, 1, 3, 2, 0, 3]  # user 1: 5 then 9 by time


def test_tokens_and_order(tmp_path):
    # user 2 rates movie 13 and 7 in the same second: the file order decides
    rows = [(2, 13, 4, 50), (1, 10, 3, 20), (2, 7, 5, 50), (1, 7, 2, 10), (2, 10, 1, 40)]
    movielens = data.load_movielens(write_ml1m(tmp_path / "ml-1m", rows, num_users=2, num_movies=3))
    meta = movielens.metadata
    assert meta.movie_ids == [7, 10, 13] and (meta.sos, meta.eos, meta.vocab_size) == (3, 4, 5)
    assert meta.user_ids == [1, 2]
    assert movielens.flat_tokens.tolist() == [3, 0, 1, 4, 3, 1, 2, 0, 4]
    assert movielens.flat_ratings.tolist() == [0, 2, 3, 3, 0, 1, 4, 5, 3]
    assert data.DatasetMetadata.from_dict(meta.to_dict()) == meta


def test_ml1m_vocabulary_is_movies_plus_two():
    if not (SHARED_DATA / "ml-1m" / "movies.dat").exists():
        pytest.skip("no ../shared/data/ml-1m")
    _, users, movies, _ = releases.read_movielens(SHARED_DATA / "ml-1m")
    meta = data.tokenize("ml-1m", users, movies, pd.DataFrame(
        {"user_id": [], "movie_id": [], "rating": [], "timestamp": []}, dtype=np.int64)).metadata
    assert meta.vocab_size == 3885 and meta.num_users == 6040


def test_cache_is_used_while_valid_and_rebuilt_when_stale(tmp_path, monkeypatch):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=20, num_movies=30)
    first = data.load_movielens(folder)
    assert (folder / data.CACHE_NAME).is_file()
    read = releases.read_movielens
    monkeypatch.setattr(data, "read_movielens", lambda d: pytest.fail("cache not used"))
    cached = data.load_movielens(folder)
    assert cached.metadata == first.metadata and torch.equal(cached.flat_tokens, first.flat_tokens)
    ratings = folder / "ratings.dat"
    before = ratings.stat()
    lines = ratings.read_text().splitlines(keepends=True)
    user, movie, stars, time = lines[0].split("::")
    lines[0] = "::".join([user, movie, str(int(stars) % 5 + 1), time])  # another star, the same size
    monkeypatch.setattr(data, "read_movielens", read)
    ratings.write_text("".join(lines))
    os.utime(ratings, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ratings.stat().st_size == before.st_size
    assert not torch.equal(data.load_movielens(folder).flat_ratings, first.flat_ratings)
    with open(ratings, "a") as f:
        f.write("1::7::5::2000000000\n")
    assert data.load_movielens(folder).num_ratings == first.num_ratings + 1
    (folder / data.CACHE_NAME).write_bytes(b"garbage")
    assert data.load_movielens(folder).num_ratings == first.num_ratings + 1


def _post_windows(sequence: list[int], length: int):
    """The post's semantics: unfold(length, 1), inputs w[:-1], targets w[1:, -1]."""
    w = torch.tensor(sequence).unfold(0, length, 1)
    return w[:-1].tolist(), w[1:, -1].tolist()


def test_windows_match_the_posts_unfold(tmp_path):
    rows = [(1, 7 + 3 * m, 1 + m % 5, 100 + m) for m in range(9)]
    movielens = data.load_movielens(write_ml1m(tmp_path / "ml-1m", rows, num_users=1, num_movies=9))
    sos, eos = movielens.metadata.sos, movielens.metadata.eos
    movies = list(range(9))
    train = data.MovieLensSequenceDataset(movielens, "train", context_window_size=5)
    assert train[0][0].tolist() == [sos, 0, 1, 2, 3] and int(train[0][3]) == 4
    inputs, targets = _post_windows([sos] + movies[:-2], 5)  # leave-one-out keeps the last two
    assert train.movie_tokens.tolist() == inputs and train.target_tokens.tolist() == targets
    assert train.ratings[0].tolist() == [0, 1, 2, 3, 4]

    parts = [data.MovieLensSequenceDataset(movielens, s, 5, split="random_windows", seed=3)
             for s in ("train", "validation")]
    got = sorted(zip(torch.cat([p.movie_tokens for p in parts]).tolist(),
                     torch.cat([p.target_tokens for p in parts]).tolist()))
    inputs, targets = _post_windows([sos] + movies + [eos], 5)
    train_eos = [t for t in parts[0].target_tokens.tolist() if t == eos]
    expected = sorted((x, y) for x, y in zip(inputs, targets) if y != eos or train_eos)
    assert got == expected


def test_window_stride_spaces_targets(tmp_path):
    rows = [(1, 7 + 3 * m, 3, 100 + m) for m in range(12)]
    movielens = data.load_movielens(write_ml1m(tmp_path / "ml-1m", rows, num_users=1, num_movies=12))
    train = data.MovieLensSequenceDataset(movielens, "train", context_window_size=3, window_stride=2)
    assert train.target_tokens.tolist() == [2, 4, 6, 8]
    assert train.movie_tokens[1].tolist() == [1, 2, 3]


def test_leave_one_out_has_no_leakage(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    sets = {s: data.MovieLensSequenceDataset(movielens, s, 5) for s in data.SUBSETS}
    val, test, train = sets["validation"], sets["test"], sets["train"]
    assert len(val) == len(test) == 300
    for u in range(300):
        rows = train.user_tokens == u
        held = {int(val.target_tokens[u]), int(test.target_tokens[u])}
        assert not held & set(train.movie_tokens[rows].flatten().tolist())
        assert not held & set(train.target_tokens[rows].tolist())
    # validation inputs end right before the validation item; test inputs include it
    assert torch.equal(test.movie_tokens[:, -1], val.target_tokens)
    assert torch.equal(test.movie_tokens[:, :-1], val.movie_tokens[:, 1:])
    assert torch.equal(test.history_length, val.history_length + 1)


def test_short_histories_are_padded_with_sos(tmp_path):
    rows = [(1, 7, 3, 1), (1, 10, 4, 2), (1, 13, 5, 3)]
    movielens = data.load_movielens(write_ml1m(tmp_path / "ml-1m", rows, num_users=1, num_movies=3))
    sos = movielens.metadata.sos
    val = data.MovieLensSequenceDataset(movielens, "validation", 5)
    assert val.movie_tokens.tolist() == [[sos, sos, sos, sos, 0]] and val.target_tokens.tolist() == [1]
    assert len(data.MovieLensSequenceDataset(movielens, "train", 5)) == 0


def test_seen_mask_equals_brute_force(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    ds = data.MovieLensSequenceDataset(movielens, "test", 5)
    batch = ds.batch(torch.arange(len(ds)))
    mask = ds.seen_mask(batch)
    meta = movielens.metadata
    for i in range(0, len(ds), 37):
        u, h = int(batch.user_tokens[i]), int(batch.history_length[i])
        start = int(movielens.offsets[u]) + 1
        seen = set(movielens.flat_tokens[start:start + h].tolist()) | {meta.sos, meta.eos}
        assert set(mask[i].nonzero().flatten().tolist()) == seen
    window = ds.seen_mask(batch, "window")
    assert set(window[0].nonzero().flatten().tolist()) == set(batch.movie_tokens[0].tolist()) | {meta.sos, meta.eos}


def test_dataloader_items_and_fast_batches_agree(ml1m_dir):
    ds = data.MovieLensSequenceDataset(ml1m_dir, "train", 5)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    movie_ids, ratings, users, target_tokens, target_ratings = next(iter(loader))
    fast = next(ds.batches(64))
    assert torch.equal(movie_ids, fast.movie_tokens) and torch.equal(target_tokens, fast.target_tokens)
    assert torch.equal(users, fast.user_tokens) and torch.equal(target_ratings, fast.target_ratings)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([b.user_tokens for b in ds.batches(100, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == sorted(ds.user_tokens.tolist())


@pytest.mark.parametrize("failure", ["folder", "save"])
def test_a_cache_that_cannot_be_written_is_a_warning_and_leaves_nothing(tmp_path, monkeypatch, failure):
    from loguru import logger
    folder = write_ml1m(tmp_path / "ml-1m", num_users=20, num_movies=30)
    if failure == "folder":
        (folder / data.CACHE_NAME).mkdir()  # os.replace cannot put a file there
    else:  # a full disk: a write into the open file fails half-way
        monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"x"), (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device"))))
    warnings = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        assert data.load_movielens(folder).num_ratings > 0
    finally:
        logger.remove(sink)
    assert any("going on without the cache" in w for w in warnings)
    assert not list(folder.glob("*.tmp"))


def test_a_cache_write_that_was_killed_leaves_no_temporary_for_good(tmp_path):
    """A process killed while it wrote the cache left `.movielens_cache.pt.<pid>.tmp` in the data
    folder for good; the next write removes it, and keeps a live writer's."""
    import os
    import subprocess
    import sys
    folder = write_ml1m(tmp_path / "ml-1m", num_users=20, num_movies=30)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed, live = (folder / f".{data.CACHE_NAME}.{pid}.tmp" for pid in (ended.pid, os.getppid()))
    killed.write_bytes(b"half a cache")
    live.write_bytes(b"being written")
    data.load_movielens(folder)
    assert not killed.exists() and live.exists() and (folder / data.CACHE_NAME).is_file()
