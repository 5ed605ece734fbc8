"""The MovieLens files: every layout read back from a generated folder, malformed lines named by
file and line, the download checked and unpacked."""
import hashlib
import io
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

import data
import releases
from conftest import synthetic_ratings as fixture_ratings
from conftest import write_ml1m
from synthetic import synthetic_movies, synthetic_ratings, write_movielens

SIZE = dict(num_users=60, num_movies=80, num_ratings=3000, seed=3)


def test_a_release_folder_missing_a_file_is_not_read_as_another_release(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=20, num_movies=30)
    (folder / "users.dat").unlink()  # what is left is ML-10M's layout
    with pytest.raises(releases.DataError) as error:
        data.load_movielens(folder)
    assert str(error.value) == (f"{folder} is named after ml-1m, whose files are users.dat, movies.dat, ratings.dat, "
                                "but users.dat is missing (what is there is laid out as ml-10m); restore it, or "
                                "rename the folder")


@pytest.mark.parametrize("fmt", list(releases.FORMATS))
def test_each_format_reads_back_what_was_written(fmt, tmp_path):
    folder = write_movielens(tmp_path / f"synthetic-{fmt}", fmt, **SIZE)
    name, users, movies, ratings = releases.read_movielens(folder)
    half = fmt in ("ml-10m", "csv")
    expected = synthetic_ratings(SIZE["num_users"], SIZE["num_movies"], SIZE["num_ratings"], SIZE["seed"], half)
    assert name == fmt and releases.detect_format(folder) == fmt
    assert ratings.to_numpy().tolist() == expected.to_numpy().tolist()
    assert users.user_id.tolist() == sorted(expected.user_id.unique())
    written = synthetic_movies(SIZE["num_movies"], SIZE["seed"])
    assert movies.title.tolist() == written.title.tolist()  # commas and quotes intact
    assert any("," in t for t in movies.title) and any('"' in t for t in movies.title)
    if fmt != "ml-100k":
        assert movies.genres.tolist() == written.genres.tolist()
    assert set(ratings.rating * 2) <= set(range(1, 11)) and (ratings.rating % 1 != 0).any() == half


@pytest.mark.parametrize("fmt", list(releases.FORMATS))
def test_blank_lines_at_the_end_of_each_file_are_skipped(fmt, tmp_path):
    """As pandas and the other readers skip them (a ratings.dat that ends in a blank line was refused)."""
    folder = write_movielens(tmp_path / fmt, fmt, **SIZE)
    clean = releases.read_movielens(folder)
    for f in releases.FORMATS[fmt].files:
        with open(folder / f, "a") as file:
            file.write("\n\n")
    for before, after in zip(clean[1:], releases.read_movielens(folder)[1:]):
        assert after.dtypes.tolist() == before.dtypes.tolist() and after.equals(before)


@pytest.mark.parametrize("fmt", ["ml-1m", "csv"])
def test_a_utf8_title_in_a_latin1_movies_file_keeps_its_accents(fmt, tmp_path):
    folder = write_movielens(tmp_path / fmt, fmt, **SIZE)
    path = folder / releases.FORMATS[fmt].movies
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    first = 1 if fmt == "csv" else 0  # below the header
    latin1, utf8 = (lines[first].replace(",", ",Café ", 1).replace("::", "::Café ", 1).encode("ISO-8859-1"),
                    lines[first + 1].replace(",", ",Amélie ", 1).replace("::", "::Amélie ", 1).encode("utf-8"))
    path.write_bytes(b"".join([*(l.encode() for l in lines[:first]), latin1, utf8,
                               *(l.encode() for l in lines[first + 2:])]))
    titles = releases.read_movielens(folder)[2].title.tolist()
    assert titles[0].startswith("Café ") and titles[1].startswith("Amélie "), titles[:2]


@pytest.mark.parametrize("fmt", list(releases.FORMATS))
def test_each_format_is_ordered_by_time_then_line(fmt, tmp_path):
    folder = write_movielens(tmp_path / fmt, fmt, **SIZE)
    movielens = data.load_movielens(folder, cache=False)
    _, _, _, ratings = releases.read_movielens(folder)
    ordered = ratings.assign(line=np.arange(len(ratings))).sort_values(["user_id", "timestamp", "line"])
    assert (ordered.groupby("user_id").timestamp.apply(lambda t: t.duplicated().any())).any()  # same-second ties
    meta = movielens.metadata
    for user in range(0, meta.num_users, 5):
        history = [meta.movie_ids[t] for t in movielens.history(user)[0].tolist()]
        assert history == ordered[ordered.user_id == meta.user_ids[user]].movie_id.tolist()
    assert movielens.num_ratings == len(ratings)


def test_csv_release_takes_its_folders_name(tmp_path):
    folder = write_movielens(tmp_path / "ml-20m", "csv", **SIZE)
    assert releases.read_movielens(folder)[0] == "ml-20m"


def test_bad_csv_lines_name_file_and_line(tmp_path):
    folder = write_movielens(tmp_path / "ml-25m", "csv", **SIZE)
    lines = (folder / "ratings.csv").read_text().splitlines()
    lines[4] = "1,4,3.7,978300000"
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(releases.MovieLensFormatError, match=r"ratings.csv, line 5: rating 3.7 is not a star rating"):
        releases.read_movielens(folder)
    lines[4] = "1,4,x,978300000"
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(releases.MovieLensFormatError, match=r"ratings.csv, line 5: field 3 'x' is not a number"):
        releases.read_movielens(folder)
    (folder / "ratings.csv").write_text("user,movie,rating,time\n1,4,3,978300000\n")
    with pytest.raises(releases.MovieLensFormatError, match="ratings.csv, line 1: the header is user,movie"):
        releases.read_movielens(folder)


def test_ml1m_round_trip(ml1m_dir):
    name, users, movies, ratings = releases.read_movielens(ml1m_dir)
    rows = fixture_ratings()
    assert name == "ml-1m"
    assert ratings.to_numpy().tolist() == [list(r) for r in rows]
    assert len(users) == 300 and len(movies) == 200
    assert movies.title[0] == "Movie 0: Caf\u00e9 (1950)"  # ISO-8859-1 decoded
    assert movies.genres[0] == "Action|Comedy"


BAD_RATINGS = [
    ("1::7::3\n", "expected 4 fields"),
    ("1::7::3::10::5\n", "expected 4 fields"),
    ("x::7::3::10\n", "not an integer"),
    ("1::7::3::10.5\n", "not an integer"),
    ("1::7::6::10\n", "is not a star rating"),
    ("1::7::0::10\n", "is not a star rating"),
    ("99::7::3::10\n", "user_id 99 is not in"),
    ("1::8::3::10\n", "movie_id 8 is not in"),
]


@pytest.mark.parametrize("line,message", BAD_RATINGS)
def test_bad_ratings_name_file_and_line(tmp_path, line, message):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=3, num_movies=3)
    (folder / "ratings.dat").write_text("1::7::3::10\n2::10::4::11\n" + line + "3::13::5::12\n")
    with pytest.raises(releases.MovieLensFormatError, match=message) as error:
        releases.read_movielens(folder)
    assert f"{folder / 'ratings.dat'}, line 3" in str(error.value)


def test_bad_movies_file_names_line(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m", num_users=3, num_movies=3)
    (folder / "movies.dat").write_text("7::A (1990)::Drama\nten::B (1991)::Drama\n")
    with pytest.raises(releases.MovieLensFormatError, match=r"movies.dat, line 2: field 1 'ten'"):
        releases.read_movielens(folder)


def test_unknown_folder_is_a_clear_error(tmp_path):
    with pytest.raises(releases.DataError, match="holds no MovieLens files"):
        data.load_movielens(tmp_path)


def _zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def _serve(monkeypatch, payload: bytes):
    monkeypatch.setattr(releases, "_fetch", lambda url, dest: Path(dest).write_bytes(payload))
    monkeypatch.setitem(releases.RELEASES, "ml-1m", releases.RELEASES["ml-1m"]._replace(
        url="https://example.invalid/ml-1m.zip", md5=hashlib.md5(payload).hexdigest()))


def test_download_checks_extracts_and_skips(tmp_path, monkeypatch):
    source = write_ml1m(tmp_path / "src", num_users=3, num_movies=3)
    payload = _zip_bytes({f"ml-1m/{f}": (source / f).read_text(encoding="ISO-8859-1")
                          for f in releases.FORMATS["ml-1m"].files})
    _serve(monkeypatch, payload)
    target = releases.ensure_movielens(tmp_path / "root" / "ml-1m")
    assert releases.detect_format(target) == "ml-1m"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["ml-1m"]  # no temporaries left
    monkeypatch.setattr(releases, "_fetch", lambda url, dest: pytest.fail("downloaded twice"))
    assert releases.download_movielens("ml-1m", tmp_path / "root") == target


def test_download_refuses_bad_checksum(tmp_path, monkeypatch):
    _serve(monkeypatch, b"payload")
    monkeypatch.setitem(releases.RELEASES, "ml-1m", releases.RELEASES["ml-1m"]._replace(md5="0" * 32))
    with pytest.raises(releases.DataError, match="checksum"):
        releases.download_movielens("ml-1m", tmp_path)
    assert not (tmp_path / "ml-1m").exists()


def test_download_refuses_escaping_members(tmp_path, monkeypatch):
    _serve(monkeypatch, _zip_bytes({"ml-1m/users.dat": "", "../evil.txt": "x"}))
    with pytest.raises(releases.DataError, match="escapes"):
        releases.download_movielens("ml-1m", tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists()


def test_download_without_network_names_url_and_folder(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(releases.urllib.request, "urlopen", offline)
    with pytest.raises(releases.DataError) as error:
        releases.download_movielens("ml-1m", tmp_path)
    assert releases.RELEASES["ml-1m"].url in str(error.value)
    assert str(tmp_path / "ml-1m") in str(error.value)
