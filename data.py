"""MovieLens data: download, parse, tokenize, split by time and serve next-movie windows.

Tokens: users are numbered 0..U-1 in the order of their MovieLens ids. Movies are numbered
0..M-1 in the order of their MovieLens ids (every movie of the movies file, rated or not), then
SOS = M and EOS = M + 1, so the vocabulary holds M + 2 tokens (ML-1M: 3,883 + 2 = 3,885).

Order: each user's ratings are ordered by (timestamp, line in the ratings file), a stable order:
ratings given in the same second keep the order of the file.

Positions: user u's sequence is [SOS, m_0, ..., m_{n-1}, EOS]. A sample is (u, p): its target is
the token at position p (1 <= p <= n + 1), its input the `context_window_size` tokens before p,
left-padded with SOS, and its history the p - 1 movies before the target.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pandas as pd
import torch
from loguru import logger
from torch.utils.data import Dataset
from tqdm import tqdm

from errors import DataError
from files import write_error

GROUPLENS = "https://files.grouplens.org/datasets/movielens"


class Release(NamedTuple):
    """A MovieLens release: its archive, the folder inside it, and its size as GroupLens published it
    (tests/test_real_data.py checks a full read against it for each release it finds)."""

    url: str
    md5: str
    folder: str          # the archive's top folder, moved to data_dir
    format: str          # a key of FILES
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
# the files that identify each format, the ratings file last; checked in this order (ML-10M's
# files are a subset of ML-1M's). ml-latest-small has the csv format and no fixed checksum.
FILES = {"ml-1m": ("users.dat", "movies.dat", "ratings.dat"),
         "ml-100k": ("u.user", "u.item", "u.data"),
         "ml-10m": ("movies.dat", "ratings.dat"),
         "csv": ("movies.csv", "ratings.csv")}
CSV_RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
CSV_MOVIES_HEADER = ["movieId", "title", "genres"]
SPLITS = ("leave_one_out", "random_windows")
SUBSETS = ("train", "validation", "test")
LATEST_TIMESTAMP = 4_102_444_800  # 2100-01-01 in Unix seconds: later ones are milliseconds or garbage
SOS_RATING, EOS_RATING = 0, 3  # the post's ratings for the SOS and EOS positions
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


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
    root = Path(root)
    target = root / name
    if all((target / f).is_file() for f in FILES[release.format]):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            archive = Path(tmp) / f"{name}.zip"
            try:
                _fetch(release.url, archive)
            except urllib.error.URLError as e:
                raise DataError(f"could not download {release.url} ({e.reason}); download it by hand and unpack "
                                f"it so that {target}/ holds {', '.join(FILES[release.format])}") from None
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
    """The format of a MovieLens folder (a key of FILES), recognised by its files."""
    data_dir = Path(data_dir)
    for name, files in FILES.items():
        if all((data_dir / f).is_file() for f in files):
            return name
    raise DataNotFound(f"{data_dir} holds no MovieLens files (ML-1M: {', '.join(FILES['ml-1m'])}; ML-100K: "
                       f"{', '.join(FILES['ml-100k'])}; ML-10M: {', '.join(FILES['ml-10m'])}; ML-20M/25M/32M: "
                       f"{', '.join(FILES['csv'])}); point data_dir at one, or at a folder named after a release "
                       f"({', '.join(RELEASES)}) to download it")


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


# ----------------------------------------------------------------------------- parsing

def _split_lines(path: Path, sep: str, n_fields: int, int_fields: tuple[int, ...],
                 encoding: Optional[str] = "ISO-8859-1", float_fields: tuple[int, ...] = (),
                 skip: int = 0) -> list[list]:
    """Parse a small delimited file line by line (after `skip` header lines), with errors that
    name file and line. encoding None: UTF-8 where the file decodes as such, else ISO-8859-1."""
    text = _read_text(path) if encoding is None else path.read_text(encoding=encoding)
    rows = []
    for number, line in enumerate(text.splitlines()[skip:], 1 + skip):
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


RATING_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]


def _parse_ratings(path: Path, sep: str, header: bool) -> pd.DataFrame:
    """The C parser's reading of a ratings file; ValueError when it is not four numeric columns."""
    if sep == "::":  # split on ':' and keep every other column: the C parser takes one char
        frame = pd.read_csv(path, sep=":", header=None, engine="c", skip_blank_lines=False)
        if frame.shape[1] != 7 or frame[[1, 3, 5]].notna().to_numpy().any():
            raise ValueError
        frame = frame[[0, 2, 4, 6]]
    else:
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, engine="c", skip_blank_lines=False,
                            dtype={"rating": np.float32} if header else None)
        if header and list(frame.columns) != CSV_RATINGS_HEADER:
            raise MovieLensFormatError(f"{path}, line 1: the header is {','.join(map(str, frame.columns))}, "
                                       f"not {','.join(CSV_RATINGS_HEADER)}")
        if frame.shape[1] != 4:
            raise ValueError
    frame.columns = RATING_COLUMNS
    ids = ["user_id", "movie_id", "timestamp"]
    if not all(pd.api.types.is_integer_dtype(frame[c]) for c in ids) or not pd.api.types.is_numeric_dtype(frame.rating):
        raise ValueError
    return pd.DataFrame({"user_id": frame.user_id.to_numpy(np.int64), "movie_id": frame.movie_id.to_numpy(np.int64),
                         "rating": frame.rating.to_numpy(np.float32), "timestamp": frame.timestamp.to_numpy(np.int64)})


def read_ratings(path: str | Path, sep: str, header: bool = False) -> pd.DataFrame:
    """Read a ratings file (user, movie, rating, timestamp) with the C parser.

    `sep` is '::' (ML-1M, ML-10M), '\t' (ML-100K) or ',' (the csv releases, with a header).
    Ratings are stars, whole or half, from 0.5 to 5. Any malformed line is located by a
    line-by-line scan so that the error names it.
    """
    path = Path(path)
    first = 2 if header else 1  # the file line of the first rating
    try:
        frame = _parse_ratings(path, sep, header)
    except pd.errors.EmptyDataError:  # before ValueError, of which it is one
        frame = pd.DataFrame({n: np.zeros(0, np.float32 if n == "rating" else np.int64) for n in RATING_COLUMNS})
    except MovieLensFormatError:
        raise
    except (ValueError, pd.errors.ParserError, TypeError):
        _split_lines(path, sep, 4, (0, 1, 3), float_fields=(2,), skip=first - 1)  # raises naming the line
        raise MovieLensFormatError(f"{path}: could not be parsed as {sep!r}-separated ratings")
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


def _read_text(path: Path) -> str:
    """A movies file's text: UTF-8 where it decodes (the newer releases), else ISO-8859-1 (ML-1M)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("ISO-8859-1")


def _read_movies_csv(path: Path) -> pd.DataFrame:
    """movies.csv: movieId,title,genres, titles with commas or quotes quoted as CSV."""
    try:
        movies = pd.read_csv(io.StringIO(_read_text(path)), dtype={"movieId": np.int64, "title": str, "genres": str},
                             keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise MovieLensFormatError(f"{path}: not movieId,title,genres CSV ({str(e).splitlines()[0]})") from None
    if list(movies.columns) != CSV_MOVIES_HEADER:
        raise MovieLensFormatError(f"{path}, line 1: the header is {','.join(movies.columns)}, "
                                   f"not {','.join(CSV_MOVIES_HEADER)}")
    return movies.set_axis(["movie_id", "title", "genres"], axis=1)


def _read_movies_dat(path: Path, **encoding) -> pd.DataFrame:
    rows = _split_lines(path, "::", 3, (0,), **encoding)
    return pd.DataFrame(rows, columns=["movie_id", "title", "genres"])


def read_movielens(data_dir: str | Path) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(name, users, movies, ratings) of a MovieLens folder, ratings in file order. The name is
    the format's, or for the csv format the release the folder is named after."""
    data_dir = Path(data_dir)
    fmt = detect_format(data_dir)
    users_file = None
    if fmt == "ml-1m":
        users_file = data_dir / "users.dat"
        users = [row[0] for row in _split_lines(users_file, "::", 5, (0,))]
        movies = _read_movies_dat(data_dir / "movies.dat")
        ratings = read_ratings(data_dir / "ratings.dat", "::")
    elif fmt == "ml-100k":
        users_file = data_dir / "u.user"
        users = [row[0] for row in _split_lines(users_file, "|", 5, (0,))]
        movies = pd.DataFrame([(row[0], row[1], "|".join(g for g, flag in zip(ML100K_GENRES, row[5:]) if flag == "1"))
                               for row in _split_lines(data_dir / "u.item", "|", 24, (0,))],
                              columns=["movie_id", "title", "genres"])
        ratings = read_ratings(data_dir / "u.data", "\t")
    elif fmt == "ml-10m":
        movies = _read_movies_dat(data_dir / "movies.dat", encoding=None)
        ratings = read_ratings(data_dir / "ratings.dat", "::")
    else:
        movies = _read_movies_csv(data_dir / "movies.csv")
        ratings = read_ratings(data_dir / "ratings.csv", ",", header=True)
    ratings_file, first_line = data_dir / FILES[fmt][-1], 2 if fmt == "csv" else 1
    if ratings.empty:
        raise DataError(f"{ratings_file} holds no ratings; restore the file, or download the data set again")
    if users_file is None:  # ML-10M and the csv releases have no users file: users are who rated
        users = np.unique(ratings.user_id.to_numpy())
    users = pd.DataFrame({"user_id": users})
    for frame, key, file in ((users, "user_id", users_file), (movies, "movie_id", data_dir / FILES[fmt][-2])):
        duplicated = frame[key].duplicated().to_numpy()
        if duplicated.any():
            raise MovieLensFormatError(f"{file}, line {np.argmax(duplicated) + 1 + (fmt == 'csv')}: "
                                       f"{key} {frame[key].iat[np.argmax(duplicated)]} repeats")
        unknown = ~ratings[key].isin(frame[key]).to_numpy()
        if unknown.any():
            line = int(np.argmax(unknown))
            raise MovieLensFormatError(f"{ratings_file}, line {line + first_line}: {key} "
                                       f"{ratings[key].iat[line]} is not in {file}")
    ratings = drop_duplicate_ratings(ratings, ratings_file, first_line)
    name = data_dir.name if fmt == "csv" and data_dir.name in RELEASES else fmt
    return name, users, movies, ratings


# ----------------------------------------------------------------------------- tokens and order

@dataclass
class DatasetMetadata:
    """Token <-> MovieLens id <-> title/genres maps; saved in every checkpoint."""

    name: str
    movie_ids: list[int]   # MovieLens movie id of each movie token
    titles: list[str]
    genres: list[str]
    user_ids: list[int]    # MovieLens user id of each user token

    @property
    def num_movies(self) -> int:
        return len(self.movie_ids)

    @property
    def sos(self) -> int:
        return self.num_movies

    @property
    def eos(self) -> int:
        return self.num_movies + 1

    @property
    def vocab_size(self) -> int:
        return self.num_movies + 2

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetMetadata":
        return cls(**d)


@dataclass
class MovieLensData:
    """All ratings in tokens, ordered by (user, timestamp, line), in one flat sequence layout.

    `sequence` holds [SOS, m_0 .. m_{n-1}, EOS] for each user back to back; user u's SOS sits at
    `offsets[u]`, its n = `lengths[u]` movies follow. `sequence_ratings` mirrors it.
    """

    metadata: DatasetMetadata
    sequence: torch.Tensor          # int64 [sum(n_u + 2)]
    sequence_ratings: torch.Tensor  # float32 [sum(n_u + 2)], stars
    offsets: torch.Tensor           # int64 [U]
    lengths: torch.Tensor           # int64 [U]

    @property
    def num_ratings(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: str | torch.device) -> "MovieLensData":
        return MovieLensData(self.metadata, *(t.to(device) for t in
                                              (self.sequence, self.sequence_ratings, self.offsets, self.lengths)))

    def windows(self, users: torch.Tensor, before: torch.Tensor,
                context_window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings) [N, context] just before position `before` of each user,
        left-padded with the user's SOS."""
        slots = window_index(self.offsets, users, before, context_window_size)
        return self.sequence[slots], self.sequence_ratings[slots]

    def history(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings) of a user's ratings in time order."""
        first = int(self.offsets[user]) + 1
        last = first + int(self.lengths[user])
        return self.sequence[first:last], self.sequence_ratings[first:last]


def _dense_tokens(sorted_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The index of each value in sorted_ids (every value is known to be there)."""
    if len(sorted_ids) == 0 or sorted_ids[0] < 0 or sorted_ids[-1] > 16 * len(sorted_ids) + 1024:
        return np.searchsorted(sorted_ids, values)
    table = np.zeros(sorted_ids[-1] + 1, dtype=np.int64)
    table[sorted_ids] = np.arange(len(sorted_ids))
    return table[values]


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """The indices that order ratings by (user, timestamp, position in the file), for any int64
    timestamps: one sort of a packed key where user and time fit in 63 bits, else lexsort."""
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64)
    low = int(timestamp.min())
    time_bits = (int(timestamp.max()) - low).bit_length()
    if time_bits + int(user.max()).bit_length() <= 63:
        return np.argsort((user.astype(np.int64) << time_bits) | (timestamp - low), kind="stable")
    return np.lexsort((timestamp, user))  # stable too: ties keep file order


def tokenize(name: str, users: pd.DataFrame, movies: pd.DataFrame,
             ratings: pd.DataFrame) -> MovieLensData:
    """Map ids to dense tokens and lay out each user's ratings in time order."""
    user_ids = np.sort(users.user_id.to_numpy())
    movie_order = np.argsort(movies.movie_id.to_numpy(), kind="stable")
    movie_ids = movies.movie_id.to_numpy()[movie_order]
    metadata = DatasetMetadata(name, movie_ids.tolist(), movies.title.to_numpy()[movie_order].tolist(),
                               movies.genres.to_numpy()[movie_order].tolist(), user_ids.tolist())
    user = _dense_tokens(user_ids, ratings.user_id.to_numpy())
    movie = _dense_tokens(movie_ids, ratings.movie_id.to_numpy())
    order = time_order(user, ratings.timestamp.to_numpy())
    user, movie, rating = user[order], movie[order], ratings.rating.to_numpy()[order]
    lengths = np.bincount(user, minlength=len(user_ids))
    offsets = np.concatenate(([0], np.cumsum(lengths + 2)[:-1]))
    sequence = np.full(int((lengths + 2).sum()), metadata.sos, dtype=np.int64)
    sequence[offsets + lengths + 1] = metadata.eos
    sequence_ratings = np.full(len(sequence), SOS_RATING, dtype=np.float32)
    sequence_ratings[offsets + lengths + 1] = EOS_RATING
    slots = np.arange(len(user)) + 2 * user + 1  # the i-th rating of the sorted order
    sequence[slots] = movie
    sequence_ratings[slots] = rating
    return MovieLensData(metadata, *(torch.from_numpy(a) for a in (sequence, sequence_ratings, offsets, lengths)))


CACHE_NAME = ".movielens_cache.pt"
CACHE_VERSION = 2


def _cache_key(data_dir: Path) -> dict:
    """What the cache depends on: the format version and each raw file's size and mtime."""
    files = FILES[detect_format(data_dir)]
    return {"version": CACHE_VERSION,
            "files": [[f, (data_dir / f).stat().st_size, (data_dir / f).stat().st_mtime_ns] for f in files]}


def load_movielens(data_dir: str | Path, cache: bool = True) -> MovieLensData:
    """Read and tokenize the MovieLens folder data_dir.

    With `cache`, the tokenized data is kept beside the raw files in .movielens_cache.pt, used
    while the raw files keep their size and mtime and rebuilt when they change.
    """
    data_dir = Path(data_dir)
    key = _cache_key(data_dir)
    path = data_dir / CACHE_NAME
    if cache and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved["key"] == key:
                return MovieLensData(DatasetMetadata.from_dict(saved["metadata"]), *saved["tensors"])
        except Exception as e:  # a broken cache is rebuilt, never trusted
            logger.warning(f"ignoring unreadable cache {path}: {e}")
    data = tokenize(*read_movielens(data_dir))
    if cache:
        try:
            tmp = path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
            torch.save({"key": key, "metadata": data.metadata.to_dict(),
                        "tensors": [data.sequence, data.sequence_ratings, data.offsets, data.lengths]}, tmp)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning(f"could not write the cache {path}: {e}")
    return data


# ----------------------------------------------------------------------------- splits

def _regular_positions(users: np.ndarray, first: np.ndarray, last: np.ndarray,
                       step: int) -> tuple[np.ndarray, np.ndarray]:
    """All (user, p) with p = first, first + step, ... <= last, per user, without a Python loop."""
    counts = np.maximum((last - first) // step + 1, 0)
    user = np.repeat(users, counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return user, np.repeat(first, counts) + k * step


def last_training_position(lengths: np.ndarray) -> np.ndarray:
    """leave_one_out: the position of each user's last training target (users with fewer than
    3 ratings keep them all for training)."""
    return np.where(lengths >= 3, lengths - 2, lengths)


def window_index(offsets: torch.Tensor, user: torch.Tensor, before: torch.Tensor,
                 context_window_size: int) -> torch.Tensor:
    """Flat sequence slots [N, context_window_size] of the tokens just before position `before` of each user,
    left-padded with the user's SOS."""
    c = context_window_size
    return offsets[user][:, None] + (before[:, None] - c + torch.arange(c, device=before.device)).clamp(min=0)


def split_positions(data: MovieLensData, split: str, subset: str, context_window_size: int,
                    window_stride: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (user, target position) pairs of one subset of a split.

    leave_one_out: per user with at least 3 ratings the last is the test target, the one
    before the validation target; training windows target only earlier ratings (users with
    fewer ratings are training-only). random_windows: the post's split, a seeded random 10% of
    all windows (EOS targets included in training) is validation, and test is validation; it
    leaks the future into training.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    n = data.lengths.numpy()
    users = np.arange(len(n))
    if split == "leave_one_out":
        held_out = n >= 3
        if subset != "train":
            p = n - (subset == "validation")
            return users[held_out], p[held_out]
        return _regular_positions(users, np.full_like(n, context_window_size), last_training_position(n),
                                  window_stride)
    user, p = _regular_positions(users, np.full_like(n, context_window_size), n + 1, window_stride)
    in_train = np.random.default_rng(seed).random(len(user)) < 0.9
    if subset == "train":
        return user[in_train], p[in_train]
    keep = ~in_train & (p <= n[user])  # evaluation targets are movies, never EOS
    return user[keep], p[keep]


# ----------------------------------------------------------------------------- datasets

class Batch(NamedTuple):
    """Next-movie windows, one target each: what the window mode trains on and every scorer ranks."""

    movie_ids: torch.Tensor      # [B, T] input window
    ratings: torch.Tensor        # [B, T]
    user_ids: torch.Tensor       # [B]
    next_movie: torch.Tensor     # [B] target
    next_rating: torch.Tensor    # [B]
    history_length: torch.Tensor  # [B] movies the user rated before the target

    @property
    def padding_mask(self) -> torch.Tensor:
        """Bool [B, T]: True where a window position lies before the user's SOS (left padding)."""
        t = self.movie_ids.shape[1]
        real = (self.history_length + 1).clamp(max=t)  # the movies before the target, and SOS
        return torch.arange(t, device=real.device)[None, :] < (t - real)[:, None]

    def hidden_and_targets(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's last hidden layer for each window's next movie, and that movie."""
        return model.hidden(self.movie_ids, self.user_ids, self.padding_mask), self.next_movie

    def num_targets(self) -> int:
        return len(self.next_movie)


def seen_mask(data: MovieLensData, batch: Batch, exclude: str = "history") -> torch.Tensor:
    """Bool [B, vocab]: movies to drop from the ranking, plus SOS and EOS.

    exclude='history' drops every movie the user rated before the target (the honest
    protocol); 'window' drops only the input window's movies (the post's behaviour). `data`
    must sit on the batch's device.
    """
    b, device = len(batch.user_ids), batch.user_ids.device
    mask = torch.zeros(b, data.metadata.vocab_size, dtype=torch.bool, device=device)
    mask[:, [data.metadata.sos, data.metadata.eos]] = True
    if exclude == "window":
        mask[torch.arange(b, device=device)[:, None], batch.movie_ids] = True
        return mask
    if exclude != "history":
        raise ValueError(f"exclude must be 'history' or 'window', got {exclude!r}")
    counts = batch.history_length
    rows = torch.repeat_interleave(torch.arange(b, device=device), counts)
    # a row's history starts at its user's first slot; less the entries of the rows before it
    shift = data.offsets[batch.user_ids] + 1 - (torch.cumsum(counts, 0) - counts)
    tokens = data.sequence[torch.arange(len(rows), device=device) + shift[rows]]
    mask.view(-1)[rows * mask.shape[1] + tokens] = True
    return mask


def with_context(batch: Batch, data: MovieLensData, context_window_size: int) -> Batch:
    """The batch's targets with windows of another length, for a model of another context; data
    on the batch's device."""
    movie_ids, ratings = data.windows(batch.user_ids, batch.history_length + 1, context_window_size)
    return batch._replace(movie_ids=movie_ids, ratings=ratings)


def latest_windows(data: MovieLensData, users: torch.Tensor, context_window_size: int) -> Batch:
    """Windows that end with each user's last rating, to recommend what comes next.

    The target slot holds EOS: the next movie is unknown.
    """
    n = data.lengths[users]
    eos = torch.full_like(users, data.metadata.eos)
    return Batch(*data.windows(users, n + 1, context_window_size), users, eos, torch.zeros_like(users), n)


def shared_starts(n: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The first rows of the batches this process takes of n rows: every batch for one process;
    for `world` processes, batches rank, rank + world, ..., the same number for each (a last
    round that not every process could take is left out: DistributedDataParallel steps together)."""
    batches = -(-n // batch_size)
    return range(rank * batch_size, batches // world * world * batch_size, world * batch_size)


class MovieLensSequenceDataset(Dataset):
    """Next-movie windows of one subset: each a user and a target position, its window gathered
    from the user's sequence when a batch is made, so memory grows with the number of targets,
    not with targets times the context.

    Items are `(movie_ids, ratings, user_id, next_movie, next_rating)` as in the post, so
    `DataLoader` code works; `batches()` is the fast path: shuffled index slices of tensors that
    may already sit on the training device.
    """

    fixed_batch_shapes = True  # every full batch has one shape: it can be compiled and CUDA-graphed
    TENSORS = ("user_ids", "positions", "next_movie", "next_rating")  # one row per target

    def __init__(self, data: MovieLensData | str | Path, subset: str = "train",
                 context_window_size: int = 5, window_stride: int = 1,
                 split: str = "leave_one_out", seed: int = 0):
        if not isinstance(data, MovieLensData):
            data = load_movielens(data)
        if context_window_size < 1 or window_stride < 1:
            raise ValueError("context_window_size and window_stride must be at least 1")
        self.data, self.subset, self.split = data, subset, split
        self.metadata = data.metadata
        self.context_window_size, self.window_stride, self.seed = context_window_size, window_stride, seed
        user, position = (torch.from_numpy(a) for a in
                          split_positions(data, split, subset, context_window_size, window_stride, seed))
        self.user_ids, self.positions = user, position
        self.next_movie = data.sequence[data.offsets[user] + position]
        self.next_rating = data.sequence_ratings[data.offsets[user] + position]
        self.device_data = data  # the sequence layout on the dataset's device

    def __len__(self) -> int:
        return len(self.next_movie)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        """Batches per epoch, per process when `world` processes share them (batches())."""
        return -(-len(self) // batch_size) // world

    def shard(self, rank: int, world: int) -> "MovieLensSequenceDataset":
        """The targets rank, rank + world, ... of this subset: one process's share of validation."""
        part = copy.copy(self)
        for key in self.TENSORS:
            setattr(part, key, getattr(self, key)[rank::world])
        return part

    def __getitem__(self, i: int):
        movie_ids, ratings = self.windows(torch.tensor([i]))
        return movie_ids[0], ratings[0], self.user_ids[i], self.next_movie[i], self.next_rating[i]

    def windows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings) [N, context] of the windows at index, gathered from the sequences."""
        return self.device_data.windows(self.user_ids[index], self.positions[index], self.context_window_size)

    @property
    def history_length(self) -> torch.Tensor:
        """Movies each user rated before the target [N]."""
        return self.positions - 1

    @property
    def movie_ids(self) -> torch.Tensor:
        """Every window's movie tokens [N, context], gathered: for inspection, not for training."""
        return self.windows(slice(None))[0]

    @property
    def ratings(self) -> torch.Tensor:
        """Every window's ratings [N, context], gathered: for inspection, not for training."""
        return self.windows(slice(None))[1]

    @property
    def device(self) -> torch.device:
        return self.user_ids.device

    def to(self, device: str | torch.device) -> "MovieLensSequenceDataset":
        """Move every tensor (the shared sequence layout too) to device, in place."""
        for key in self.TENSORS:
            setattr(self, key, getattr(self, key).to(device))
        self.device_data = self.data.to(device)
        return self

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(*self.windows(index), self.user_ids[index], self.next_movie[index], self.next_rating[index],
                     self.positions[index] - 1)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Batches as index slices; shuffled with `generator` when asked. With `world` processes,
        this one's share: batches rank, rank + world, ... of the same order, as many for each."""
        n = len(self)
        order = (torch.randperm(n, generator=generator).to(self.device) if shuffle
                 else torch.arange(n, device=self.device))
        for start in shared_starts(n, batch_size, rank, world):
            yield self.batch(order[start:start + batch_size])

    def seen_mask(self, batch: Batch, exclude: str = "history") -> torch.Tensor:
        return seen_mask(self.device_data, batch, exclude)

    def target_counts(self) -> torch.Tensor:
        """How often each token is a target here, [vocab]: the in-batch negatives' sampling rates."""
        return torch.bincount(self.next_movie.cpu(), minlength=self.metadata.vocab_size)

    def training_popularity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, mean rating) per token over this split's training interactions, whichever
        subset this is.

        leave_one_out: every rating before each user's validation target. random_windows: every
        rating that is not a validation target.
        """
        d, vocab = self.data, self.metadata.vocab_size
        users = np.arange(len(d.lengths))
        n = d.lengths.numpy()
        held = np.concatenate([d.offsets.numpy()[u] + p for u, p in (
            split_positions(d, self.split, subset, self.context_window_size, self.window_stride, self.seed)
            for subset in ("validation", "test"))])
        user, p = _regular_positions(users, np.ones_like(n), n, 1)
        keep = ~np.isin(d.offsets.numpy()[user] + p, held)
        slots = torch.from_numpy(d.offsets.numpy()[user[keep]] + p[keep])
        movies, ratings = d.sequence[slots], d.sequence_ratings[slots].double()
        count = torch.bincount(movies, minlength=vocab).double()
        total = torch.bincount(movies, weights=ratings, minlength=vocab)
        return count, total / count.clamp(min=1)



class ChunkBatch(NamedTuple):
    """Chunks of users' histories, a target at every position: what the sequence mode trains on."""

    movie_ids: torch.Tensor     # [B, T] inputs, left-padded
    user_ids: torch.Tensor      # [B]
    targets: torch.Tensor       # [B, T] the movie after each input position
    loss_mask: torch.Tensor     # [B, T] positions whose target this chunk trains on
    padding_mask: torch.Tensor  # [B, T] positions before the user's SOS

    def hidden_and_targets(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's last hidden layer at every trained position, and the movie that follows each."""
        return (model.sequence_hidden(self.movie_ids, self.user_ids, self.padding_mask, self.loss_mask),
                self.targets[self.loss_mask])

    def num_targets(self) -> torch.Tensor:
        return self.loss_mask.sum()  # a tensor: counting needs no host copy


class SequenceChunks:
    """Training data of the `sequence` mode: each user's training history as chunks of at most
    `context_window_size` inputs, trained to predict the next movie at every position.

    Histories longer than the context are cut into chunks whose boundaries are drawn afresh
    each epoch; every training target is trained on exactly once per epoch, each with the full
    context before it. Only leave_one_out training targets are used: a user's validation and
    test targets are never inputs or targets here.
    """

    fixed_batch_shapes = False  # the number of trained positions varies from batch to batch

    def __init__(self, data: MovieLensData, context_window_size: int, split: str = "leave_one_out"):
        if split != "leave_one_out":
            raise ValueError("the sequence mode trains on the leave_one_out split only")
        self.data, self.metadata = data, data.metadata
        self.context_window_size = context_window_size
        self.last_target = last_training_position(data.lengths.numpy())
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        """Training targets per epoch."""
        return int(self.last_target.sum())

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        """Batches per epoch (per process of `world`), on average: chunk boundaries move each epoch."""
        expected_chunks = int((self.last_target >= 1).sum()) + len(self) / self.context_window_size
        return -(-int(expected_chunks) // batch_size) // world

    def target_counts(self) -> torch.Tensor:
        """How often each token is a training target, [vocab]: the in-batch negatives' sampling rates."""
        users = np.arange(len(self.last_target))
        user, p = _regular_positions(users, np.ones_like(self.last_target), self.last_target, 1)
        targets = self.data.sequence[torch.from_numpy(self.data.offsets.numpy()[user] + p)]
        return torch.bincount(targets, minlength=self.metadata.vocab_size)

    def to(self, device: str | torch.device) -> "SequenceChunks":
        self.device = torch.device(device)
        return self

    def chunks(self, generator: torch.Generator) -> ChunkBatch:
        """All chunks of one epoch, with boundaries drawn from generator."""
        c, last = self.context_window_size, self.last_target
        users = np.flatnonzero(last >= 1)
        last = last[users]
        shift = torch.randint(1, c + 1, (len(users),), generator=generator).numpy()
        counts = 1 + np.maximum(-(-(last - shift) // c), 0)  # newest chunk, then full ones
        user = np.repeat(users, counts)
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        newest_end = np.repeat(last, counts)
        end = np.where(k == 0, newest_end, newest_end - np.repeat(shift, counts) - (k - 1) * c)
        lower = np.where(k == 0, end - np.repeat(shift, counts), end - c)  # covers (lower, end]
        position = end[:, None] - c + 1 + np.arange(c)  # target positions
        offsets, sequence = self.data.offsets, self.data.sequence
        user, end = torch.from_numpy(user), torch.from_numpy(end)
        tensors = (sequence[window_index(offsets, user, end, c)], user, sequence[window_index(offsets, user, end + 1, c)],
                   torch.from_numpy((position > lower[:, None]) & (position >= 1)), torch.from_numpy(position - 1 < 0))
        return ChunkBatch(*(t.to(self.device) for t in tensors))

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                rank: int = 0, world: int = 1) -> Iterator[ChunkBatch]:
        """Batches of `batch_size` chunks, freshly cut and shuffled each call (this process's
        share of them with `world` processes, as MovieLensSequenceDataset.batches)."""
        generator = generator or torch.Generator().manual_seed(0)
        chunks = self.chunks(generator)
        n = len(chunks.user_ids)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        for start in shared_starts(n, batch_size, rank, world):
            index = order[start:start + batch_size]
            yield ChunkBatch(*(t[index] for t in chunks))
