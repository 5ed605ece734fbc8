"""Top-K lists as CSV files, `user_id,rank,item_id` in MovieLens ids, rank 1 first.

eval.py --save-predictions and recommend.py --all-users write them; eval.py --predictions reads
one (this repo's or another system's) to score it on the same targets with the same metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data import DatasetMetadata
from errors import UserError
from files import atomic_write

if TYPE_CHECKING:
    import pandas as pd  # imported where a file is read: half a second of every script's start

COLUMNS = ["user_id", "rank", "item_id"]


def write_lists(path: Path, user_tokens: torch.Tensor, lists: torch.Tensor, metadata: DatasetMetadata) -> None:
    """Each user's list (tokens [N, K], -1 entries left out) as rows of `path`, written atomically."""
    import pandas as pd
    users = np.repeat(np.asarray(metadata.user_ids)[user_tokens.cpu().numpy()], lists.shape[1])
    ranks = np.tile(np.arange(1, lists.shape[1] + 1), len(lists))
    tokens = lists.cpu().numpy().ravel()
    keep = tokens >= 0
    table = pd.DataFrame({"user_id": users[keep], "rank": ranks[keep],
                          "item_id": np.asarray(metadata.movie_ids)[tokens[keep]]})
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def read_lists(path: Path, metadata: DatasetMetadata) -> torch.Tensor:
    """The lists of a CSV as tokens [num_users, L] by user token (L: the longest list; -1 where a
    list is shorter or the user has none), checked: the columns, integer ids of this data set,
    one item per user and rank, no item twice in a list."""
    import pandas as pd
    table = read_table(path)
    users = token_of(table.user_id.to_numpy(), metadata.user_ids, path, table, "user_id", "users")
    movies = token_of(table.item_id.to_numpy(), metadata.movie_ids, path, table, "item_id", "movies")
    for columns, what in (((users, table["rank"].to_numpy()), "two items at one rank"),
                          ((users, movies), "one item twice in a user's list")):
        twice = pd.DataFrame(dict(enumerate(columns))).duplicated().to_numpy()
        if twice.any():
            raise UserError(f"{path}, line {line_of(table, twice)}: {what} (user {table.user_id.iloc[twice.argmax()]})")
    order = np.lexsort((table["rank"].to_numpy(), users))
    users, movies = users[order], movies[order]
    first = np.searchsorted(users, users)  # each row's user's first row, in sorted order
    place = np.arange(len(users)) - first
    lists = torch.full((metadata.num_users, int(place.max()) + 1 if len(place) else 0), -1, dtype=torch.int64)
    lists[torch.from_numpy(users), torch.from_numpy(place)] = torch.from_numpy(movies)
    return lists


def read_table(path: Path) -> pd.DataFrame:
    import pandas as pd
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as a CSV file ({type(e).__name__}: {e})") from None
    if list(table.columns) != COLUMNS:
        raise UserError(f"{path}: the header is {','.join(table.columns)}; give the columns {','.join(COLUMNS)} "
                        "(MovieLens ids, rank 1 first)")
    for column in COLUMNS:
        number = pd.to_numeric(table[column], errors="coerce")
        bad = (number.isna() | (number != number.round())).to_numpy()
        if bad.any() or (column == "rank" and (number < 1).any()):
            at = bad.argmax() if bad.any() else int((number < 1).to_numpy().argmax())
            raise UserError(f"{path}, line {at + 2}: {column} {table[column].iloc[at]!r} is not a"
                            f"{' positive' if column == 'rank' else 'n'} integer")
        table[column] = number.astype(np.int64)
    return table


def token_of(ids: np.ndarray, known: list[int], path: Path, table: pd.DataFrame, column: str,
             what: str) -> np.ndarray:
    """The tokens of MovieLens ids; a UserError naming the line of the first id the data set lacks."""
    known = np.asarray(known)
    order = np.argsort(known)
    at = np.searchsorted(known, ids, sorter=order).clip(max=len(known) - 1)
    tokens = order[at]
    missing = known[tokens] != ids
    if missing.any():
        raise UserError(f"{path}, line {line_of(table, missing)}: {column} {ids[missing.argmax()]} is not one of the "
                        f"{len(known):,} {what} of the data set")
    return tokens


def line_of(table: pd.DataFrame, rows: np.ndarray) -> int:
    """The file line of the first marked row (the header is line 1)."""
    return int(rows.argmax()) + 2
