"""The MovieLens files: every release's layout (FORMATS), its download and checksum, and its reader.

GroupLens published MovieLens in four layouts. FORMATS describes each once; the readers here,
synthetic.py (which writes folders in them) and benchmarks/bench.py (the post-style loader) all
read that table. `read_movielens` returns plain pandas frames in MovieLens ids and file order;
data.py turns them into tokens. Every malformed line is an error that names its file and line.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np
from loguru import logger
from tqdm import tqdm

from errors import DataError
from files import write_error

if TYPE_CHECKING:
    import pandas as pd  # imported where a file is read: half a second of every script's start

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
RATING_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
LATEST_TIMESTAMP = 4_102_444_800  # 2100-01-01 in Unix seconds: later ones are milliseconds or garbage


@dataclass(frozen=True)
class Format:
    """How one MovieLens layout writes its files."""

    ratings: str                     # user, movie, stars, Unix seconds
    movies: str                      # movie, title, genres
    users: Optional[str]             # None: no users file, the users are those who rated
    ratings_separator: str
    separator: str                   # of the users and movies files ("," : CSV with quoting)
    ratings_header: Optional[str]    # the ratings file's first line, where it has one
    movies_header: Optional[str]
    movies_encoding: Optional[str]   # of the lines that are not UTF-8 (read_text); None: ISO-8859-1
    genre_flags: bool                # genres as ML-100K's 19 0/1 columns, not "A|B" names
    half_stars: bool                 # ratings in half stars from 0.5
    star_format: str                 # how the ratings file writes a star (4; 3.5 and 4; 4.0)
    user_columns: tuple[str, ...] = ()  # the users file's fields between the user id and the zip code

    @property
    def files(self) -> tuple[str, ...]:
        """The files that identify the layout, the ratings file last."""
        return tuple(f for f in (self.users, self.movies, self.ratings) if f)

    @property
    def first_rating_line(self) -> int:
        return 2 if self.ratings_header else 1


FORMATS = {  # checked in this order: ML-10M's files are a subset of ML-1M's
    "ml-1m": Format("ratings.dat", "movies.dat", "users.dat", "::", "::", None, None, "ISO-8859-1",
                    False, False, "{:.0f}", ("sex", "age", "occupation")),  # age: the lower bound of a group
    "ml-100k": Format("u.data", "u.item", "u.user", "\t", "|", None, None, "ISO-8859-1", True, False, "{:.0f}",
                      ("age", "sex", "occupation")),  # age in years, occupation a name
    "ml-10m": Format("ratings.dat", "movies.dat", None, "::", "::", None, None, None, False, True, "{:g}"),
    "csv": Format("ratings.csv", "movies.csv", None, ",", ",", "userId,movieId,rating,timestamp",
                  "movieId,title,genres", None, False, True, "{:.1f}"),
}
USERS_FIELDS = 5  # ML-1M and ML-100K: user, then age, sex, occupation (Format.user_columns), zip code


class Release(NamedTuple):
    """A MovieLens release: its archive, the folder inside it, and its size as GroupLens published it
    (tests/test_real_data.py checks a full read against it for each release it finds)."""

    url: str
    md5: str
    folder: str          # the archive's top folder, moved to data_dir
    format: str          # a key of FORMATS
    sizes: tuple[int, int, int]  # ratings, users, movies


RELEASES = {
    "ml-100k": Release(f"{GROUPLENS}/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "ml-100k", "ml-100k",
                       (100_000, 943, 1_682)),
    "ml-1m": Release(f"{GROUPLENS}/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m", "ml-1m",
                     (1_000_209, 6_040, 3_883)),
    "ml-10m": Release(f"{GROUPLENS}/ml-10m.zip", "ce571fd55effeba0271552578f2648bd", "ml-10M100K", "ml-10m",
                      (10_000_054, 69_878, 10_681)),
    "ml-20m": Release(f"{GROUPLENS}/ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m", "csv",
                      (20_000_263, 138_493, 27_278)),
    "ml-25m": Release(f"{GROUPLENS}/ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m", "csv",
                      (25_000_095, 162_541, 62_423)),
    "ml-32m": Release(f"{GROUPLENS}/ml-32m.zip", "d472be332d4daa821edc399621853b57", "ml-32m", "csv",
                      (32_000_204, 200_948, 87_585)),
}


class DataNotFound(DataError):
    """A folder that holds no MovieLens data set."""


class MovieLensFormatError(DataError):
    """A MovieLens file does not hold what its format says; the message names file and line."""


# ----------------------------------------------------------------------------- download

def download_movielens(name: str, root: str | Path) -> Path:
    """Download and unpack a MovieLens release into root/name unless its files are there."""
    if name not in RELEASES:
        raise DataError(f"unknown MovieLens release {name!r}; known: {', '.join(RELEASES)}")
    release = RELEASES[name]
    files = FORMATS[release.format].files
    root = Path(root)
    target = root / name
    if all((target / f).is_file() for f in files):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            archive = Path(tmp) / f"{name}.zip"
            try:
                _fetch(release.url, archive)
            except urllib.error.URLError as e:
                raise DataError(f"could not download {release.url} ({e.reason}); download it by hand and unpack "
                                f"it so that {target}/ holds {', '.join(files)}") from None
            digest = _md5(archive)
            if digest != release.md5:
                raise DataError(f"{release.url}: checksum {digest} differs from GroupLens' {release.md5}; "
                                "download it again, or by hand")
            _safe_extract(archive, Path(tmp) / "out")
            if target.exists():
                shutil.rmtree(target)
            os.replace(Path(tmp) / "out" / release.folder, target)
    except OSError as e:
        raise write_error(target, e, "choose a writable data_dir, or download the data by hand") from None
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url.rsplit('/', 1)[-1]}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip, refusing members whose path would land outside dest."""
    dest = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            path = (dest / member).resolve()
            if path != dest and dest not in path.parents:
                raise DataError(f"{archive}: member {member!r} escapes {dest}; the archive is not GroupLens'")
        zf.extractall(dest)


def detect_format(data_dir: str | Path) -> str:
    """The format of a MovieLens folder (a key of FORMATS), recognised by its files. A folder
    named after a release must hold that release's files: an ML-1M folder that lost users.dat
    would otherwise read as ML-10M's layout."""
    data_dir = Path(data_dir)
    for name, fmt in FORMATS.items():
        if all((data_dir / f).is_file() for f in fmt.files):
            release = RELEASES.get(data_dir.name)
            if release and release.format != name:
                expected = FORMATS[release.format].files
                missing = [f for f in expected if not (data_dir / f).is_file()]
                raise DataError(f"{data_dir} is named after {data_dir.name}, whose files are {', '.join(expected)}, "
                                f"but {', '.join(missing)} is missing (what is there is laid out as {name}); "
                                "restore it, or rename the folder")
            return name
    layouts = "; ".join(f"{name}: {', '.join(fmt.files)}" for name, fmt in FORMATS.items())
    raise DataNotFound(f"{data_dir} holds no MovieLens files ({layouts}; csv is ML-20M/25M/32M); point data_dir "
                       f"at one, or at a folder named after a release ({', '.join(RELEASES)}) to download it")


def ensure_movielens(data_dir: str | Path) -> Path:
    """data_dir if it holds MovieLens files, else download the release its folder name names."""
    data_dir = Path(data_dir)
    try:
        detect_format(data_dir)
        return data_dir
    except DataNotFound:
        if data_dir.name not in RELEASES:
            raise
    return download_movielens(data_dir.name, data_dir.parent)


# ----------------------------------------------------------------------------- readers

def read_text(path: Path, encoding: Optional[str] = None) -> str:
    """A file's text: UTF-8 where the whole file decodes (the newer releases), else line by line,
    each line as UTF-8 where it decodes and as `encoding` (default ISO-8859-1, the older releases')
    where not, so that a title pasted in UTF-8 into an older file keeps its accents."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(decode_line(line, encoding or "ISO-8859-1") for line in raw.splitlines(keepends=True))


def decode_line(line: bytes, encoding: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode(encoding)


def split_lines(path: Path, sep: str, n_fields: int, int_fields: tuple[int, ...], encoding: Optional[str] = None,
                float_fields: tuple[int, ...] = (), skip: int = 0) -> list[list]:
    """Parse a small delimited file line by line (after `skip` header lines), with errors that
    name file and line."""
    rows, lines = [], read_text(path, encoding).splitlines()
    while lines and not lines[-1]:  # blank lines at the end, which pandas' readers skip too
        lines.pop()
    for number, line in enumerate(lines[skip:], 1 + skip):
        fields = line.split(sep)
        if len(fields) != n_fields:
            raise MovieLensFormatError(f"{path}, line {number}: expected {n_fields} fields "
                                       f"separated by {sep!r}, found {len(fields)}")
        for i, kind in [(i, int) for i in int_fields] + [(i, float) for i in float_fields]:
            try:
                fields[i] = kind(fields[i])
            except ValueError:
                raise MovieLensFormatError(f"{path}, line {number}: field {i + 1} "
                                           f"{fields[i]!r} is not {'an integer' if kind is int else 'a number'}") from None
        rows.append(fields)
    return rows


def without_blank_tail(frame: pd.DataFrame) -> pd.DataFrame:
    """A ratings frame less the empty rows that blank lines at the end of its file leave (pandas'
    readers skip them too); columns the blanks alone made float are integers again."""
    blank = frame.isna().all(axis=1).to_numpy()
    if not blank[-1:].any():
        return frame
    frame = frame.iloc[:len(blank) - int(np.argmin(blank[::-1])) if not blank.all() else 0]
    whole = [c for c in frame.columns if frame[c].dtype.kind == "f" and (frame[c] % 1 == 0).all()]
    return frame.astype({c: np.int64 for c in whole})


def _parse_ratings(path: Path, sep: str, header: Optional[str]) -> pd.DataFrame:
    """The C parser's reading of a ratings file; ValueError when it is not four numeric columns."""
    import pandas as pd
    if sep == "::":  # split on ':' and keep every other column: the C parser takes one char
        frame = pd.read_csv(path, sep=":", header=None, engine="c", skip_blank_lines=False)
        if frame.shape[1] != 7 or frame[[1, 3, 5]].notna().to_numpy().any():
            raise ValueError
        frame = frame[[0, 2, 4, 6]]
    else:
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, engine="c", skip_blank_lines=False,
                            dtype={"rating": np.float32} if header else None)
        if header and ",".join(map(str, frame.columns)) != header:
            raise MovieLensFormatError(f"{path}, line 1: the header is {','.join(map(str, frame.columns))}, "
                                       f"not {header}")
        if frame.shape[1] != 4:
            raise ValueError
    frame.columns = RATING_COLUMNS
    frame = without_blank_tail(frame)
    ids = ["user_id", "movie_id", "timestamp"]
    if not all(pd.api.types.is_integer_dtype(frame[c]) for c in ids) or not pd.api.types.is_numeric_dtype(frame.rating):
        raise ValueError
    return pd.DataFrame({"user_id": frame.user_id.to_numpy(np.int64), "movie_id": frame.movie_id.to_numpy(np.int64),
                         "rating": frame.rating.to_numpy(np.float32), "timestamp": frame.timestamp.to_numpy(np.int64)})


def read_ratings(path: str | Path, fmt: Format) -> pd.DataFrame:
    """Read a ratings file (user, movie, rating, timestamp) of the format fmt with the C parser.

    Ratings are stars, whole or half, from 0.5 to 5. Any malformed line is located by a
    line-by-line scan so that the error names it.
    """
    import pandas as pd
    path, first = Path(path), fmt.first_rating_line
    try:
        frame = _parse_ratings(path, fmt.ratings_separator, fmt.ratings_header)
    except pd.errors.EmptyDataError:  # before ValueError, of which it is one
        frame = pd.DataFrame({n: np.zeros(0, np.float32 if n == "rating" else np.int64) for n in RATING_COLUMNS})
    except MovieLensFormatError:
        raise
    except (ValueError, pd.errors.ParserError, TypeError):
        split_lines(path, fmt.ratings_separator, 4, (0, 1, 3), float_fields=(2,), skip=first - 1)  # names the line
        raise MovieLensFormatError(f"{path}: could not be parsed as {fmt.ratings_separator!r}-separated ratings")
    stars = frame.rating.to_numpy() * 2
    bad = np.flatnonzero((stars < 1) | (stars > 10) | (stars != np.round(stars)))
    if len(bad):
        raise MovieLensFormatError(f"{path}, line {bad[0] + first}: rating {frame.rating.iat[bad[0]]:g} "
                                   "is not a star rating from 0.5 to 5 in whole or half stars")
    bad = np.flatnonzero((frame.timestamp < 0) | (frame.timestamp >= LATEST_TIMESTAMP))
    if len(bad):
        raise MovieLensFormatError(f"{path}, line {bad[0] + first}: timestamp {frame.timestamp.iat[bad[0]]} is not "
                                   "a Unix time in seconds between 1970 and 2100; give timestamps in seconds")
    return frame


def drop_duplicate_ratings(ratings: pd.DataFrame, path: Path, first_line: int) -> pd.DataFrame:
    """ratings without repeats of a line's user, movie and timestamp (the first of each kept),
    with a warning that gives their number and the first repeat's line."""
    users, movies = ratings.user_id.to_numpy(), ratings.movie_id.to_numpy()
    pair = users * (int(movies.max()) + 1) + movies
    pairs = np.sort(pair, kind="stable")  # files list a user's ratings together: sorting is fast
    if not (pairs[1:] == pairs[:-1]).any():  # no user rated a movie twice: no duplicates
        return ratings
    repeat = ratings.duplicated(["user_id", "movie_id", "timestamp"]).to_numpy()
    if repeat.any():
        logger.warning(f"{path}: {repeat.sum():,} duplicate ratings (same user, movie and timestamp as an earlier "
                       f"line; the first at line {np.argmax(repeat) + first_line}) dropped, the first of each kept")
    return ratings[~repeat].reset_index(drop=True)


def read_movies(path: Path, fmt: Format) -> pd.DataFrame:
    """movie_id, title, genres ("A|B") of a movies file in the format fmt."""
    import pandas as pd
    if fmt.movies_header:  # CSV: titles with commas or quotes are quoted
        try:
            movies = pd.read_csv(io.StringIO(read_text(path, fmt.movies_encoding)), keep_default_na=False,
                                 dtype={"movieId": np.int64, "title": str, "genres": str})
        except (ValueError, pd.errors.ParserError) as e:
            raise MovieLensFormatError(f"{path}: not {fmt.movies_header} CSV ({str(e).splitlines()[0]})") from None
        if ",".join(movies.columns) != fmt.movies_header:
            raise MovieLensFormatError(f"{path}, line 1: the header is {','.join(movies.columns)}, "
                                       f"not {fmt.movies_header}")
        return movies.set_axis(["movie_id", "title", "genres"], axis=1)
    if fmt.genre_flags:  # id|title|release date|video date|IMDb URL|19 flags
        rows = split_lines(path, fmt.separator, 5 + len(ML100K_GENRES), (0,), fmt.movies_encoding)
        rows = [(row[0], row[1], "|".join(g for g, flag in zip(ML100K_GENRES, row[5:]) if flag == "1"))
                for row in rows]
    else:
        rows = split_lines(path, fmt.separator, 3, (0,), fmt.movies_encoding)
    return pd.DataFrame(rows, columns=["movie_id", "title", "genres"])


def read_users(path: Path, fmt: Format) -> pd.DataFrame:
    """user_id and the format's user_columns (age an integer, sex and occupation as written) of a
    users file."""
    import pandas as pd
    ages = (1 + fmt.user_columns.index("age"),)
    rows = split_lines(path, fmt.separator, USERS_FIELDS, (0, *ages), "ISO-8859-1")
    return pd.DataFrame([row[:1 + len(fmt.user_columns)] for row in rows], columns=["user_id", *fmt.user_columns])


def read_movielens(data_dir: str | Path) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(name, users, movies, ratings) of a MovieLens folder, ratings in file order. The name is
    the format's, or for the csv format the release the folder is named after; users holds the
    users file's age, sex and occupation where the release has one."""
    import pandas as pd
    data_dir = Path(data_dir)
    name = detect_format(data_dir)
    fmt = FORMATS[name]
    movies = read_movies(data_dir / fmt.movies, fmt)
    ratings_file = data_dir / fmt.ratings
    ratings = read_ratings(ratings_file, fmt)
    if ratings.empty:
        raise DataError(f"{ratings_file} holds no ratings; restore the file, or download the data set again")
    users = (read_users(data_dir / fmt.users, fmt) if fmt.users else
             pd.DataFrame({"user_id": np.unique(ratings.user_id.to_numpy())}))
    listed = [(users, "user_id", fmt.users, False)] if fmt.users else []  # else the users are those who rated
    for frame, key, file, header in [*listed, (movies, "movie_id", fmt.movies, bool(fmt.movies_header))]:
        duplicated = frame[key].duplicated().to_numpy()
        if duplicated.any():
            raise MovieLensFormatError(f"{data_dir / file}, line {np.argmax(duplicated) + 1 + header}: "
                                       f"{key} {frame[key].iat[np.argmax(duplicated)]} repeats")
        unknown = ~ratings[key].isin(frame[key]).to_numpy()
        if unknown.any():
            line = int(np.argmax(unknown))
            raise MovieLensFormatError(f"{ratings_file}, line {line + fmt.first_rating_line}: {key} "
                                       f"{ratings[key].iat[line]} is not in {data_dir / file}")
    ratings = drop_duplicate_ratings(ratings, ratings_file, fmt.first_rating_line)
    if name == "csv" and data_dir.name in RELEASES:
        name = data_dir.name
    return name, users, movies, ratings
