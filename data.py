"""MovieLens as tokens: dense ids, each user's ratings in time order, splits and data sets.

Tokens: users are numbered 0..U-1 in the order of their MovieLens ids. Movies are numbered
0..M-1 in the order of their MovieLens ids (every movie of the movies file, rated or not), then
SOS = M and EOS = M + 1, so the vocabulary holds M + 2 tokens (ML-1M: 3,883 + 2 = 3,885).
Tensors named `*_tokens` hold tokens; `DatasetMetadata.movie_ids` and `user_ids` hold the
MovieLens ids they stand for.

Order: each user's ratings are ordered by (timestamp, line in the ratings file), a stable order:
ratings given in the same second keep the order of the file.

Positions: user u's history is [SOS, m_0, ..., m_{n-1}, EOS] in the flat layout
(MovieLensData). A target (u, p) is the token at position p (1 <= p <= n + 1), its window the
`context_window_size` tokens before p, left-padded with SOS, and its history the p - 1 movies
before it. The files themselves are read by releases.py.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional, Protocol

import numpy as np
import torch
from loguru import logger
from torch.utils.data import Dataset

from errors import UserError
from files import atomic_write, torch_save
from releases import FORMATS, detect_format, read_movielens

if TYPE_CHECKING:
    import pandas as pd  # annotations only

SPLITS = ("leave_one_out", "random_windows")
SUBSETS = ("train", "validation", "test")
SOS_RATING, EOS_RATING = 0, 3  # the post's ratings for the SOS and EOS positions


# ----------------------------------------------------------------------------- tokens and order

@dataclass
class DatasetMetadata:
    """Token <-> MovieLens id <-> title/genres maps; saved in every checkpoint."""

    name: str
    movie_ids: list[int]   # MovieLens movie id of each movie token
    titles: list[str]
    genres: list[str]
    user_ids: list[int]    # MovieLens user id of each user token
    # per user token, a token for each attribute the users file gives (age group, sex, occupation)
    user_features: dict[str, list[int]] = field(default_factory=dict)

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

    def same_data(self, other: "DatasetMetadata") -> bool:
        """Whether other holds this data set's tokens: the same maps, and the same user features
        where this has any (a checkpoint saved before they were read has none)."""
        mine, theirs = self.to_dict(), other.to_dict()
        if not mine["user_features"]:
            theirs["user_features"] = {}
        return mine == theirs

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetMetadata":
        return cls(**d)


@dataclass
class MovieLensData:
    """All ratings in tokens, ordered by (user, timestamp, line), in the flat layout.

    `flat_tokens` holds [SOS, m_0 .. m_{n-1}, EOS] for each user back to back; user u's SOS sits
    at `offsets[u]`, its n = `lengths[u]` movies follow. `flat_ratings` holds their stars and
    `flat_times` their timestamps; SOS takes the time of the user's first rating and EOS that of
    the last, so that a time gap to either is zero rather than decades.
    """

    metadata: DatasetMetadata
    flat_tokens: torch.Tensor       # int64 [sum(n_u + 2)]
    flat_ratings: torch.Tensor      # float32 [sum(n_u + 2)], stars
    flat_times: torch.Tensor        # int64 [sum(n_u + 2)], seconds since 1970 (UTC)
    offsets: torch.Tensor           # int64 [U]
    lengths: torch.Tensor           # int64 [U]

    @property
    def num_ratings(self) -> int:
        return int(self.lengths.sum())

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields after metadata, in order."""
        return self.flat_tokens, self.flat_ratings, self.flat_times, self.offsets, self.lengths

    def to(self, device: str | torch.device) -> "MovieLensData":
        return MovieLensData(self.metadata, *(t.to(device) for t in self.tensors))

    def windows(self, users: torch.Tensor, before: torch.Tensor,
                context_window_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings, times) [N, context] just before position `before` of each
        user, left-padded with the user's SOS."""
        slots = window_index(self.offsets, users, before, context_window_size)
        return self.flat_tokens[slots], self.flat_ratings[slots], self.flat_times[slots]

    def history(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings) of a user's ratings in time order."""
        first = int(self.offsets[user]) + 1
        last = first + int(self.lengths[user])
        return self.flat_tokens[first:last], self.flat_ratings[first:last]


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
    users = users.sort_values("user_id", kind="stable")
    user_ids = users.user_id.to_numpy()
    movie_order = np.argsort(movies.movie_id.to_numpy(), kind="stable")
    movie_ids = movies.movie_id.to_numpy()[movie_order]
    metadata = DatasetMetadata(name, movie_ids.tolist(), movies.title.to_numpy()[movie_order].tolist(),
                               movies.genres.to_numpy()[movie_order].tolist(), user_ids.tolist(),
                               user_feature_tokens(users))
    user = _dense_tokens(user_ids, ratings.user_id.to_numpy())
    movie = _dense_tokens(movie_ids, ratings.movie_id.to_numpy())
    order = time_order(user, ratings.timestamp.to_numpy())
    user, movie, rating = user[order], movie[order], ratings.rating.to_numpy()[order]
    timestamp = ratings.timestamp.to_numpy().astype(np.int64)[order]
    lengths = np.bincount(user, minlength=len(user_ids))
    offsets = np.concatenate(([0], np.cumsum(lengths + 2)[:-1]))
    flat_tokens = np.full(int((lengths + 2).sum()), metadata.sos, dtype=np.int64)
    flat_tokens[offsets + lengths + 1] = metadata.eos
    flat_ratings = np.full(len(flat_tokens), SOS_RATING, dtype=np.float32)
    flat_ratings[offsets + lengths + 1] = EOS_RATING
    slots = np.arange(len(user)) + 2 * user + 1  # the i-th rating of the sorted order
    flat_tokens[slots] = movie
    flat_ratings[slots] = rating
    flat_times = _flat_times(timestamp, slots, offsets, lengths, len(flat_tokens))
    return MovieLensData(metadata, *(torch.from_numpy(a) for a in
                                     (flat_tokens, flat_ratings, flat_times, offsets, lengths)))


AGE_GROUPS = (18, 25, 35, 45, 50, 56)  # ML-1M's age groups after "under 18", by their lower bounds


def user_feature_tokens(users: pd.DataFrame) -> dict[str, list[int]]:
    """A token per user (in the frame's order) for each attribute the users file gives: the age
    group (ML-1M's seven; ML-100K's ages fall into them), sex, and occupation (0.. in sorted order
    of the values as written)."""
    tokens = {}
    if "age" in users:
        tokens["age"] = np.searchsorted(AGE_GROUPS, users.age.to_numpy(), side="right").tolist()
    for name in ("sex", "occupation"):
        if name in users:
            tokens[name] = np.unique(users[name].astype(str).to_numpy(), return_inverse=True)[1].tolist()
    return tokens


YEAR_FIRST, YEAR_STEP, YEAR_BUCKETS = 1920, 5, 24  # 0: no year; 1: before 1920; 5 years each; the last: 2025 on
TITLE_YEAR = re.compile(r"\((\d{4})[^()]*\)\s*$")  # "Toy Story (1995)", "Dexter (2006–2013)"


def movie_feature_tensors(metadata: DatasetMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's genres, multi-hot over the data set's genre names (float32 [vocab, G]), and its
    release-year bucket from the title (int64 [vocab]); SOS and EOS have neither."""
    names = sorted({g for genres in metadata.genres for g in genres.split("|") if g})
    column = {name: i for i, name in enumerate(names)}
    genres = torch.zeros(metadata.vocab_size, len(names))
    for token, movie_genres in enumerate(metadata.genres):
        genres[token, [column[g] for g in movie_genres.split("|") if g]] = 1.0
    years = torch.zeros(metadata.vocab_size, dtype=torch.int64)
    for token, title in enumerate(metadata.titles):
        match = TITLE_YEAR.search(title)
        if match:
            years[token] = min(max((int(match.group(1)) - YEAR_FIRST) // YEAR_STEP + 2, 1), YEAR_BUCKETS - 1)
    return genres, years


def _flat_times(timestamp: np.ndarray, slots: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                size: int) -> np.ndarray:
    """The flat layout's timestamps: each rating's at its slot, SOS the user's first, EOS the last
    (0 for a user without ratings)."""
    flat = np.zeros(size, dtype=np.int64)
    flat[slots] = timestamp
    rated = lengths > 0
    flat[offsets[rated]] = flat[offsets[rated] + 1]
    flat[offsets[rated] + lengths[rated] + 1] = flat[offsets[rated] + lengths[rated]]
    return flat


CACHE_NAME = ".movielens_cache.pt"
CACHE_VERSION = 5


def _cache_key(data_dir: Path) -> dict:
    """What the cache depends on: the format version and each raw file's size and SHA-1 (about a
    second for ML-32M's 880 MB; an edit that keeps a file's size and time is still seen)."""
    files = FORMATS[detect_format(data_dir)].files
    return {"version": CACHE_VERSION, "files": [[f, (data_dir / f).stat().st_size, _sha1(data_dir / f)] for f in files]}


def _sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def load_movielens(data_dir: str | Path, cache: bool = True) -> MovieLensData:
    """Read and tokenize the MovieLens folder data_dir.

    With `cache`, the tokenized data is kept beside the raw files in .movielens_cache.pt, used
    while the raw files keep their contents and rebuilt when they change.
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
        saved = {"key": key, "metadata": data.metadata.to_dict(), "tensors": list(data.tensors)}
        try:
            atomic_write(path, lambda tmp: torch_save(saved, tmp))
        except UserError as e:
            logger.warning(f"{e}; going on without the cache (trainer_config.cache: false turns it off)")
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
    """Flat-layout slots [N, context_window_size] of the tokens just before position `before` of each user,
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
    assert split in SPLITS and subset in SUBSETS, (split, subset)
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


# ----------------------------------------------------------------------------- windows

class Batch(Protocol):
    """What the model reads of a batch, each field by name, and what the loss compares its output with.

    Two layouts hold it: WindowBatch, one target a row at its last position (the window mode's
    training, every evaluation and recommendation), and ChunkBatch, a target at chosen positions of
    rows that may hold several chunks of users' histories (the sequence mode's training). A new
    input is a field of both, filled where the data sets make their batches, read by the model.
    """

    movie_tokens: torch.Tensor         # [R, T] the input movies
    ratings: torch.Tensor              # [R, T] their stars
    times: torch.Tensor                # [R, T] their timestamps
    user_tokens: torch.Tensor          # [R] (one user a row) or [R, T] (the user of each position)
    positions: Optional[torch.Tensor]  # [R, T] each input's position-embedding index; None: 0..T-1 in every row
    segments: torch.Tensor             # [R, T] which chunk of its row each position belongs to; -1: no input
    query_times: torch.Tensor          # [R, T] the time of the rating each position predicts, when it is asked for
    predict: Optional[torch.Tensor]    # bool [R, T] positions whose next movie is a target; None: each row's last
    target_tokens: torch.Tensor        # [N] the target movie of each predicting position, in row-major order
    target_ratings: torch.Tensor       # [N] the stars the user gave each target
    num_targets: torch.Tensor | int    # N, a tensor where counting it would read the device

    def fills(self, batch_size: int) -> bool:
        """Whether this batch has the one shape that is compiled and captured as a CUDA graph."""


class WindowBatch(NamedTuple):
    """Next-movie windows, one target each, left-padded with the user's SOS (Batch's first layout)."""

    movie_tokens: torch.Tensor    # [B, T] input window
    ratings: torch.Tensor         # [B, T]
    times: torch.Tensor           # [B, T] timestamps
    user_tokens: torch.Tensor     # [B]
    target_tokens: torch.Tensor   # [B] the movie after the window
    target_ratings: torch.Tensor  # [B]
    target_times: torch.Tensor    # [B] the target's timestamp: when the recommendation is asked for
    history_length: torch.Tensor  # [B] movies the user rated before the target

    positions = None  # the window's own positions
    predict = None    # the last position

    @property
    def padding_mask(self) -> torch.Tensor:
        """Bool [B, T]: True where a window position lies before the user's SOS (left padding)."""
        t = self.movie_tokens.shape[1]
        real = (self.history_length + 1).clamp(max=t)  # the movies before the target, and SOS
        return torch.arange(t, device=real.device)[None, :] < (t - real)[:, None]

    @property
    def segments(self) -> torch.Tensor:
        return -self.padding_mask.long()

    @property
    def query_times(self) -> torch.Tensor:
        """Each position predicts the next input's rating; the last, the target's."""
        return torch.cat([self.times[:, 1:], self.target_times[:, None]], 1)

    @property
    def num_targets(self) -> int:
        return len(self.target_tokens)

    def fills(self, batch_size: int) -> bool:
        return len(self.target_tokens) == batch_size


EXCLUDE = ("history", "window")


def seen_mask(data: MovieLensData, batch: WindowBatch, exclude: str = "history") -> torch.Tensor:
    """Bool [B, vocab]: movies to drop from the ranking, plus SOS and EOS.

    exclude='history' drops every movie the user rated before the target (the honest
    protocol); 'window' drops only the input window's movies (the post's behaviour). `data`
    must sit on the batch's device.
    """
    assert exclude in EXCLUDE, exclude
    b, device = len(batch.user_tokens), batch.user_tokens.device
    mask = torch.zeros(b, data.metadata.vocab_size, dtype=torch.bool, device=device)
    mask[:, [data.metadata.sos, data.metadata.eos]] = True
    if exclude == "window":
        mask[torch.arange(b, device=device)[:, None], batch.movie_tokens] = True
        return mask
    counts = batch.history_length
    rows = torch.repeat_interleave(torch.arange(b, device=device), counts)
    # a row's history starts at its user's first slot; less the entries of the rows before it
    shift = data.offsets[batch.user_tokens] + 1 - (torch.cumsum(counts, 0) - counts)
    tokens = data.flat_tokens[torch.arange(len(rows), device=device) + shift[rows]]
    mask.view(-1)[rows * mask.shape[1] + tokens] = True
    return mask


def with_context(batch: WindowBatch, data: MovieLensData, context_window_size: int) -> WindowBatch:
    """The batch's targets with windows of another length, for a model of another context; data
    on the batch's device."""
    movie_tokens, ratings, times = data.windows(batch.user_tokens, batch.history_length + 1, context_window_size)
    return batch._replace(movie_tokens=movie_tokens, ratings=ratings, times=times)


def latest_windows(data: MovieLensData, users: torch.Tensor, context_window_size: int,
                   at: torch.Tensor | None = None) -> WindowBatch:
    """Windows that end with each user's last rating, to recommend what comes next, asked at
    time `at` ([B] or one timestamp; default: the moment of each user's last rating).

    The target slot holds EOS: the next movie is unknown.
    """
    n = data.lengths[users]
    eos_slot = data.offsets[users] + n + 1
    eos = torch.full_like(users, data.metadata.eos)
    at = data.flat_times[eos_slot] if at is None else torch.as_tensor(at, dtype=torch.int64).expand(len(users))
    movie_tokens, ratings, times = data.windows(users, n + 1, context_window_size)
    return WindowBatch(movie_tokens, ratings, times, users, target_tokens=eos,
                       target_ratings=torch.zeros_like(users, dtype=torch.float32), target_times=at, history_length=n)


def shared_starts(n: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The first rows of the batches this process takes of n rows: every batch for one process;
    for `world` processes, batches rank, rank + world, ..., the same number for each (a last
    round that not every process could take is left out: DistributedDataParallel steps together)."""
    batches = -(-n // batch_size)
    return range(rank * batch_size, batches // world * world * batch_size, world * batch_size)


class MovieLensSequenceDataset(Dataset):
    """Next-movie windows of one subset: each a user and a target position, its window gathered
    from the flat layout when a batch is made, so memory grows with the number of targets, not
    with targets times the context.

    Items are `(movie_tokens, ratings, user_token, target_token, target_rating)`, the post's tuple,
    so `DataLoader` code works; `batches()` is the fast path: shuffled index slices of tensors
    that may already sit on the training device.
    """

    batch_shapes = "fixed"  # every full batch has one shape: it can be compiled and CUDA-graphed
    TENSORS = ("user_tokens", "positions", "target_tokens", "target_ratings", "target_times")  # one row per target

    def __init__(self, data: MovieLensData | str | Path, subset: str = "train",
                 context_window_size: int = 5, window_stride: int = 1,
                 split: str = "leave_one_out", seed: int = 0):
        if not isinstance(data, MovieLensData):
            data = load_movielens(data)
        self.data, self.subset, self.split = data, subset, split
        self.metadata = data.metadata
        self.context_window_size, self.window_stride, self.seed = context_window_size, window_stride, seed
        user, position = (torch.from_numpy(a) for a in
                          split_positions(data, split, subset, context_window_size, window_stride, seed))
        self.user_tokens, self.positions = user, position
        self.target_tokens = data.flat_tokens[data.offsets[user] + position]
        self.target_ratings = data.flat_ratings[data.offsets[user] + position]
        self.target_times = data.flat_times[data.offsets[user] + position]
        self.device_data = data  # the flat layout on the dataset's device

    def __len__(self) -> int:
        return len(self.target_tokens)

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
        movie_tokens, ratings, _ = self.windows(torch.tensor([i]))
        return movie_tokens[0], ratings[0], self.user_tokens[i], self.target_tokens[i], self.target_ratings[i]

    def windows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(movie tokens, ratings, times) [N, context] of the windows at index, gathered from the flat layout."""
        return self.device_data.windows(self.user_tokens[index], self.positions[index], self.context_window_size)

    @property
    def history_length(self) -> torch.Tensor:
        """Movies each user rated before the target [N]."""
        return self.positions - 1

    @property
    def movie_tokens(self) -> torch.Tensor:
        """Every window's movie tokens [N, context], gathered: for inspection, not for training."""
        return self.windows(slice(None))[0]

    @property
    def ratings(self) -> torch.Tensor:
        """Every window's ratings [N, context], gathered: for inspection, not for training."""
        return self.windows(slice(None))[1]

    @property
    def device(self) -> torch.device:
        return self.user_tokens.device

    def to(self, device: str | torch.device) -> "MovieLensSequenceDataset":
        """Move every tensor (the shared flat layout too) to device, in place."""
        for key in self.TENSORS:
            setattr(self, key, getattr(self, key).to(device))
        self.device_data = self.data.to(device)
        return self

    def batch(self, index: torch.Tensor) -> WindowBatch:
        movie_tokens, ratings, times = self.windows(index)
        return WindowBatch(movie_tokens, ratings, times, self.user_tokens[index], self.target_tokens[index],
                           self.target_ratings[index], self.target_times[index], self.positions[index] - 1)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world: int = 1) -> Iterator[WindowBatch]:
        """Batches as index slices; shuffled with `generator` when asked. With `world` processes,
        this one's share: batches rank, rank + world, ... of the same order, as many for each."""
        n = len(self)
        order = (torch.randperm(n, generator=generator).to(self.device) if shuffle
                 else torch.arange(n, device=self.device))
        for start in shared_starts(n, batch_size, rank, world):
            yield self.batch(order[start:start + batch_size])

    def seen_mask(self, batch: WindowBatch, exclude: str = "history") -> torch.Tensor:
        return seen_mask(self.device_data, batch, exclude)

    def target_counts(self) -> torch.Tensor:
        """How often each token is a target here, [vocab]: the in-batch negatives' sampling rates."""
        return torch.bincount(self.target_tokens.cpu(), minlength=self.metadata.vocab_size)

    def training_popularity(self) -> "Popularity":
        """Each token's popularity over this split's training interactions, whichever subset this is.

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
        movies, ratings = d.flat_tokens[slots], d.flat_ratings[slots].double()
        count = torch.bincount(movies, minlength=vocab).double()
        total = torch.bincount(movies, weights=ratings, minlength=vocab)
        pairs = torch.from_numpy(user[keep]) * vocab + movies  # a user who rated a movie twice counts once
        raters = torch.bincount(pairs.unique() % vocab, minlength=vocab).double()
        return Popularity(count, total / count.clamp(min=1), raters, int(np.unique(user[keep]).size))


class Popularity(NamedTuple):
    """Per token [vocab], from a split's training interactions."""

    count: torch.Tensor        # float64: training ratings
    mean_rating: torch.Tensor  # float64: their mean (0 without any)
    raters: torch.Tensor       # float64: distinct users who rated it
    users: int                 # users with a training rating


# ----------------------------------------------------------------------------- chunks (sequence mode)

class ChunkBatch(NamedTuple):
    """Chunks of users' histories, a target at every trained position (Batch's second layout):
    what the sequence mode trains on.

    A row holds one chunk, left-padded to the context (HistoryChunks.chunks), or several chunks
    side by side (packed_batch). Each position carries its chunk's user, its position in that
    chunk's left-padded frame (what the position embedding reads) and which chunk of the row it
    belongs to, so a packed row computes exactly what its chunks' padded rows would.
    """

    movie_tokens: torch.Tensor  # [R, T] inputs
    ratings: torch.Tensor       # [R, T] each input's stars
    times: torch.Tensor         # [R, T] each input's timestamp
    user_tokens: torch.Tensor   # [R, T] the user of each position's chunk
    positions: torch.Tensor     # [R, T] each input's position in its chunk's left-padded frame
    segments: torch.Tensor      # [R, T] which chunk of the batch each position belongs to; -1: padding
    predict: torch.Tensor       # [R, T] positions whose next movie this chunk trains on
    next_tokens: torch.Tensor   # [R, T] the movie after each input position
    next_ratings: torch.Tensor  # [R, T] its stars
    next_times: torch.Tensor    # [R, T] its timestamp

    @property
    def padding_mask(self) -> torch.Tensor:
        """Bool [R, T]: True at positions that hold no input (before a user's SOS, or a row's free end)."""
        return self.segments < 0

    @property
    def query_times(self) -> torch.Tensor:
        return self.next_times

    @property
    def target_tokens(self) -> torch.Tensor:
        return self.next_tokens[self.predict]

    @property
    def target_ratings(self) -> torch.Tensor:
        return self.next_ratings[self.predict]

    @property
    def num_targets(self) -> torch.Tensor:
        return self.predict.sum()

    def fills(self, batch_size: int) -> bool:
        """Always: the rows vary anyway, and are compiled with dynamic shapes."""
        return True


# what a packed row holds where no chunk is
PAD_VALUES = ChunkBatch(movie_tokens=0, ratings=0.0, times=0, user_tokens=0, positions=0, segments=-1, predict=False,
                        next_tokens=0, next_ratings=0.0, next_times=0)


def pack_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks into rows of `width` positions, first-fit decreasing, every batch at once.

    lengths [N, B]: the real length of each of the B chunks of N batches (0: no chunk). Returns
    the row of its batch that each chunk goes to and its first column there, [N, B] each, and each
    batch's number of rows [N]. The loop runs over a batch's B chunks, largest first, never over
    the batches."""
    n, b = lengths.shape
    order = np.argsort(-lengths, axis=1, kind="stable")
    fill = np.zeros((n, b), dtype=np.int64)  # the columns used in each batch's rows
    row, column = np.zeros((n, b), dtype=np.int64), np.zeros((n, b), dtype=np.int64)
    batches = np.arange(n)
    for j in range(b):
        chunk = order[:, j]
        length = lengths[batches, chunk]
        first = np.argmax(fill + length[:, None] <= width, axis=1)  # an empty row always has room
        row[batches, chunk], column[batches, chunk] = first, fill[batches, first]
        fill[batches, first] += length
    return row, column, (fill > 0).sum(1)


def packed_batch(chunks: ChunkBatch, row: torch.Tensor, column: torch.Tensor, rows: int) -> ChunkBatch:
    """The left-padded chunks of one batch moved into `rows` rows: chunk i's real positions
    start at column[i] of row[i] (pack_rows' plan); its segment is i."""
    width = chunks.movie_tokens.shape[1]
    real = ~chunks.padding_mask
    shift = row * width + column - (width - real.sum(1))  # destination minus source, per chunk
    destination = (shift[:, None] + torch.arange(width, device=shift.device))[real]
    segments = torch.arange(len(row), device=row.device)[:, None].expand(-1, width)
    packed = []
    for tensor, pad in zip(chunks._replace(segments=segments), PAD_VALUES):
        out = torch.full((rows * width,), pad, dtype=tensor.dtype, device=tensor.device)
        out[destination] = tensor[real]
        packed.append(out.view(rows, width))
    return ChunkBatch(*packed)


class HistoryChunks:
    """Training data of the `sequence` mode: each user's training history as chunks of at most
    `context_window_size` inputs, trained to predict the next movie at every position.

    Histories longer than the context are cut into chunks whose boundaries are drawn afresh
    each epoch; every training target is trained on exactly once per epoch, each with the full
    context before it. Only leave_one_out training targets are used: a user's validation and
    test targets are never inputs or targets here.

    packed: the chunks of a batch share rows where they fit (pack_rows), so that almost no
    computed position is padding (ML-1M at context 200: 57% real in left-padded rows, 98% packed);
    a batch holds the same chunks either way, and computes the same function.
    """

    def __init__(self, data: MovieLensData, context_window_size: int, packed: bool = True):
        self.data, self.metadata = data, data.metadata
        self.context_window_size, self.packed = context_window_size, packed
        self.last_target = last_training_position(data.lengths.numpy())
        self.device = torch.device("cpu")

    @property
    def batch_shapes(self) -> str:
        """Packed, rows and trained positions vary from batch to batch; else the trained positions only."""
        return "packed" if self.packed else "varying"

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
        targets = self.data.flat_tokens[torch.from_numpy(self.data.offsets.numpy()[user] + p)]
        return torch.bincount(targets, minlength=self.metadata.vocab_size)

    def to(self, device: str | torch.device) -> "HistoryChunks":
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
        user, end = torch.from_numpy(user), torch.from_numpy(end)
        inputs, targets = (window_index(self.data.offsets, user, e, c) for e in (end, end + 1))
        padding = torch.from_numpy(position - 1 < 0)
        d = self.data
        chunks = ChunkBatch(movie_tokens=d.flat_tokens[inputs], ratings=d.flat_ratings[inputs],
                            times=d.flat_times[inputs],
                            user_tokens=user[:, None].expand(-1, c), positions=torch.arange(c).expand(len(user), -1),
                            segments=torch.where(padding, -1, 0),
                            predict=torch.from_numpy((position > lower[:, None]) & (position >= 1)),
                            next_tokens=d.flat_tokens[targets], next_ratings=d.flat_ratings[targets],
                            next_times=d.flat_times[targets])
        return ChunkBatch(*(t.to(self.device) for t in chunks))

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                rank: int = 0, world: int = 1) -> Iterator[ChunkBatch]:
        """Batches of `batch_size` chunks, freshly cut and shuffled each call (this process's
        share of them with `world` processes, as MovieLensSequenceDataset.batches); packed (see
        the class) or each chunk a left-padded row of its own."""
        generator = generator or torch.Generator().manual_seed(0)
        chunks = self.chunks(generator)
        n = len(chunks.user_tokens)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        starts = shared_starts(n, batch_size, rank, world)
        if not self.packed:
            order = order.to(self.device)
            for start in starts:
                index = order[start:start + batch_size]
                yield ChunkBatch(*(t[index] for t in chunks))
            return
        slots = torch.tensor(starts)[:, None] + torch.arange(batch_size)  # [batches, batch_size]
        index = order[slots.clamp(max=n - 1)]
        lengths = torch.where(slots < n, (~chunks.padding_mask).sum(1).cpu()[index], 0)
        row, column, rows = (torch.from_numpy(a) for a in pack_rows(lengths.numpy(), self.context_window_size))
        index, row, column = (t.to(self.device) for t in (index, row, column))
        for i, (start, count) in enumerate(zip(starts, rows.tolist())):
            size = min(batch_size, n - start)
            part = ChunkBatch(*(t[index[i, :size]] for t in chunks))
            yield packed_batch(part, row[i, :size], column[i, :size], count)
