"""MovieLens-format folders of any size, for tests and benchmarks of the larger releases.

GroupLens' licence forbids redistributing its data, and the larger releases cannot be fetched
everywhere, so `write_movielens` writes a folder in any release's format with their shape:
heavy-tailed ratings per user (at least 20 each, as in MovieLens), Zipf-like movie popularity,
titles with commas and quotes (quoted in CSV), whole or half stars, ratings given in the same
second, and the file ordered by user and movie rather than by time, as GroupLens' files are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from releases import FORMATS, ML100K_GENRES

GENRES = ML100K_GENRES[1:]
FIRST_TIMESTAMP, LAST_TIMESTAMP = 820_454_400, 1_700_000_000  # 1996 to 2023


def synthetic_ratings(num_users: int, num_movies: int, num_ratings: int, seed: int = 0,
                      half_stars: bool = True) -> pd.DataFrame:
    """user_id, movie_id, rating, timestamp: num_ratings ratings (fewer only where users would
    need more movies than there are), each user rating a movie once, ordered by user then movie."""
    rng = np.random.default_rng(seed)
    lengths = user_lengths(rng, num_users, num_ratings, cap=max(num_movies // 2, 20))
    popularity = 1.0 / np.arange(1, num_movies + 1) ** 0.9
    popularity /= popularity.sum()
    movie_of_rank = rng.permutation(num_movies)  # popularity not in id order
    user, movie = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for _ in range(20):  # draw what each user still lacks, drop repeats, until (nearly) none lack any
        lacking = lengths - np.bincount(user, minlength=num_users + 1)[1:]
        if lacking.sum() <= num_ratings // 10_000:
            break
        new_user = np.repeat(np.arange(1, num_users + 1), np.maximum(lacking, 0))
        new_movie = movie_of_rank[rng.choice(num_movies, size=len(new_user), p=popularity)]
        user, movie = np.r_[user, new_user], np.r_[movie, new_movie]
        _, first = np.unique(user * num_movies + movie, return_index=True)
        first.sort()  # the earlier draw of a repeat is kept
        user, movie = user[first], movie[first]
    movie = movie * 3 + 1  # sparse MovieLens ids
    # each user's ratings come in sittings: many in one second, then a gap of minutes to months
    n = len(user)
    order = np.argsort(user, kind="stable")  # draw order within each user is time order
    user, movie = user[order], movie[order]
    gap = np.where(rng.random(n) < 0.15, 0, rng.exponential(3.0e4, n).astype(np.int64) + 1)
    start = rng.integers(FIRST_TIMESTAMP, LAST_TIMESTAMP - 5 * 10**7, num_users + 1)
    run_start = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    cumulative = np.cumsum(gap)
    timestamp = start[user] + cumulative - np.repeat(cumulative[run_start], np.diff(np.r_[run_start, n]))
    stars = rng.integers(1, 11 if half_stars else 6, n)
    rating = stars / 2 if half_stars else stars.astype(np.float64)
    frame = pd.DataFrame({"user_id": user, "movie_id": movie, "rating": rating,
                          "timestamp": np.minimum(timestamp, LAST_TIMESTAMP)})
    return frame.sort_values(["user_id", "movie_id"], kind="stable").reset_index(drop=True)


def user_lengths(rng: np.random.Generator, num_users: int, num_ratings: int, cap: int) -> np.ndarray:
    """Ratings per user: at least 20, heavy-tailed (Pareto shares), at most cap, summing to
    num_ratings where the cap allows (what capped users cannot take goes to the others)."""
    share = rng.pareto(1.2, num_users) + 1e-3
    lengths = np.full(num_users, 20.0)
    for _ in range(50):
        free = lengths < cap
        left = num_ratings - lengths.sum()
        if left < 1 or not free.any():
            break
        lengths[free] += left * share[free] / share[free].sum()
        lengths = np.minimum(lengths, cap)
    return np.floor(lengths).astype(np.int64)


def synthetic_movies(num_movies: int, seed: int = 0) -> pd.DataFrame:
    """movie_id, title, genres: some titles hold a comma ("Movie 7, The (1994)") or quotes."""
    rng = np.random.default_rng(seed)
    ids = np.arange(num_movies) * 3 + 1
    years = rng.integers(1920, 2024, num_movies)
    titles = [f'Movie {i}, The ({y})' if i % 7 == 0 else f'"Quoted" Movie {i} ({y})' if i % 11 == 0
              else f"Movie {i} ({y})" for i, y in zip(ids, years)]
    genres = ["|".join(GENRES[j] for j in sorted({i % len(GENRES), (i * 5) % len(GENRES)})) for i in range(num_movies)]
    return pd.DataFrame({"movie_id": ids, "title": titles, "genres": genres})


def write_movielens(folder: Path, fmt: str, num_users: int, num_movies: int, num_ratings: int,
                    seed: int = 0) -> Path:
    """Write a synthetic MovieLens folder in the layout FORMATS[fmt]; returns folder."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    layout, folder = FORMATS[fmt], Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ratings = synthetic_ratings(num_users, num_movies, num_ratings, seed, half_stars=layout.half_stars)
    movies = synthetic_movies(num_movies, seed)
    write_ratings(folder / layout.ratings, ratings, layout.ratings_separator, layout.ratings_header, layout.star_format)
    sep, encoding = layout.separator, layout.movies_encoding or "utf-8"
    if layout.movies_header:
        movies.to_csv(folder / layout.movies, header=layout.movies_header.split(","), index=False)
    elif layout.genre_flags:
        flags = ["|".join("1" if g in genres.split("|") else "0" for g in ML100K_GENRES) for genres in movies.genres]
        write_lines(folder / layout.movies, [f"{m}|{t}|01-Jan-1995||http://example.invalid|{f}"
                                             for m, t, f in zip(movies.movie_id, movies.title, flags)], encoding)
    else:
        write_lines(folder / layout.movies, [sep.join(map(str, row)) for row in movies.itertuples(index=False)],
                    encoding)
    if layout.users:
        write_lines(folder / layout.users, [sep.join((str(u), *user_fields(u, fmt))) for u in range(1, num_users + 1)])
    return folder


OCCUPATIONS = ("artist", "doctor", "engineer", "other", "student", "writer")


def user_fields(user: int, fmt: str) -> tuple[str, ...]:
    """A user's age, sex, occupation and zip code as the layout writes them: ML-100K an age in
    years and an occupation's name, ML-1M sex first, an age group's lower bound and a code 0-20."""
    sex = "MF"[user % 2]
    if fmt == "ml-100k":
        return str(12 + user * 7 % 60), sex, OCCUPATIONS[user % len(OCCUPATIONS)], "00000"
    return sex, str((1, 18, 25, 35, 45, 50, 56)[user % 7]), str(user % 21), "00000"


def write_ratings(path: Path, ratings: pd.DataFrame, sep: str, header: Optional[str], stars: str,
                  chunk: int = 1 << 20) -> None:
    """One line a rating, in chunks (32 million lines in well under a minute), the stars written
    with the format string `stars` as the release writes them."""
    label = np.array([stars.format(s / 2) for s in range(11)], dtype=object)
    stars = (ratings.rating.to_numpy() * 2).astype(np.int64)
    columns = (ratings.user_id.to_numpy(), ratings.movie_id.to_numpy(), label[stars], ratings.timestamp.to_numpy())
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        for i in range(0, len(ratings), chunk):
            part = [c[i:i + chunk].tolist() for c in columns]
            f.write("".join(f"{u}{sep}{m}{sep}{r}{sep}{t}\n" for u, m, r, t in zip(*part)))


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding=encoding)
