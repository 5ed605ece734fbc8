"""Every MovieLens format read from a generated folder: the same ratings, titles and order."""
import numpy as np
import pytest

import data
from synthetic import FORMATS, synthetic_movies, synthetic_ratings, write_movielens

SIZE = dict(num_users=60, num_movies=80, num_ratings=3000, seed=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_back_what_was_written(fmt, tmp_path):
    folder = write_movielens(tmp_path / f"synthetic-{fmt}", fmt, **SIZE)
    name, users, movies, ratings = data.read_movielens(folder)
    half = fmt in ("ml-10m", "csv")
    expected = synthetic_ratings(SIZE["num_users"], SIZE["num_movies"], SIZE["num_ratings"], SIZE["seed"], half)
    assert name == fmt and data.detect_format(folder) == fmt
    assert ratings.to_numpy().tolist() == expected.to_numpy().tolist()
    assert users.user_id.tolist() == sorted(expected.user_id.unique())
    written = synthetic_movies(SIZE["num_movies"], SIZE["seed"])
    assert movies.title.tolist() == written.title.tolist()  # commas and quotes intact
    assert any("," in t for t in movies.title) and any('"' in t for t in movies.title)
    if fmt != "ml-100k":
        assert movies.genres.tolist() == written.genres.tolist()
    assert set(ratings.rating * 2) <= set(range(1, 11)) and (ratings.rating % 1 != 0).any() == half


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_ordered_by_time_then_line(fmt, tmp_path):
    folder = write_movielens(tmp_path / fmt, fmt, **SIZE)
    movielens = data.load_movielens(folder, cache=False)
    _, _, _, ratings = data.read_movielens(folder)
    ordered = ratings.assign(line=np.arange(len(ratings))).sort_values(["user_id", "timestamp", "line"])
    assert (ordered.groupby("user_id").timestamp.apply(lambda t: t.duplicated().any())).any()  # same-second ties
    meta = movielens.metadata
    for user in range(0, meta.num_users, 5):
        history = [meta.movie_ids[t] for t in movielens.history(user)[0].tolist()]
        assert history == ordered[ordered.user_id == meta.user_ids[user]].movie_id.tolist()
    assert movielens.num_ratings == len(ratings)


def test_csv_release_takes_its_folders_name(tmp_path):
    folder = write_movielens(tmp_path / "ml-20m", "csv", **SIZE)
    assert data.read_movielens(folder)[0] == "ml-20m"


def test_bad_csv_lines_name_file_and_line(tmp_path):
    folder = write_movielens(tmp_path / "ml-25m", "csv", **SIZE)
    lines = (folder / "ratings.csv").read_text().splitlines()
    lines[4] = "1,4,3.7,978300000"
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.MovieLensFormatError, match=r"ratings.csv, line 5: rating 3.7 is not a star rating"):
        data.read_movielens(folder)
    lines[4] = "1,4,x,978300000"
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.MovieLensFormatError, match=r"ratings.csv, line 5: field 3 'x' is not a number"):
        data.read_movielens(folder)
    (folder / "ratings.csv").write_text("user,movie,rating,time\n1,4,3,978300000\n")
    with pytest.raises(data.MovieLensFormatError, match="ratings.csv, line 1: the header is user,movie"):
        data.read_movielens(folder)
