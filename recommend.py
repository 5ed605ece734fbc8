"""Recommend next movies: python recommend.py --checkpoint PATH --user USER_ID [-k 10] [--png OUT.png]
or, for every user at once: python recommend.py --checkpoint PATH --all-users --out FILE.csv

Prints the user's recent history and the top-k movies that would come next (MovieLens id, title,
genres, the model's probability), with every movie the user has rated removed; --png draws the
row of cards (plots.draw_cards). --all-users writes every user's top-k after all their ratings as
user_id,rank,item_id rows (predictions.py), in batches. A model trained with query time
(model_config.query_time) reads when the recommendation is asked for: --at, by default the moment
of each user's last rating. --popularity-penalty ranks by the model's score less LAMBDA x log(1 +
the movie's ratings), as eval.py's does.
"""
from __future__ import annotations

import errors  # before the libraries: Ctrl-C while they load is one line
errors.quiet_while_loading()

import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from checkpoint import data_for_checkpoint, load_checkpoint, model_from_checkpoint
from data import DatasetMetadata, MovieLensData, latest_windows, seen_mask
from errors import UserError, argument_parser, run_script
from files import refuse_to_overwrite
from predictions import write_lists
from ranking import model_scorer, popularity_penalty, top_tokens
from run import checkpoint_of, inputs_of


@torch.inference_mode()
def recommend(model, data: MovieLensData, users: torch.Tensor, k: int, at: Optional[int] = None,
              penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k tokens, probabilities) per user after all of each user's ratings, rated movies
    removed: the model's softmax over the movies the user has not rated. at: when they are
    asked for (a timestamp; default each user's last rating), for a model with query time.
    penalty: ranked by the score less penalty x log(1 + the movie's ratings); the probabilities
    stay the model's."""
    batch = latest_windows(data, users, model.config.transformer_config.context_window_size, at)
    seen = seen_mask(data, batch)
    scores = model_scorer(model)(batch)
    ranked = scores - popularity_penalty(movie_counts(data), penalty) if penalty else scores
    tokens = top_tokens(ranked, seen, k)  # ties in eval.py's order
    return tokens, scores.masked_fill(seen, float("-inf")).softmax(dim=1).gather(1, tokens)


def movie_counts(data: MovieLensData) -> torch.Tensor:
    """Ratings per token over every user's whole history (float32 [vocab])."""
    return torch.bincount(data.flat_tokens, minlength=data.metadata.vocab_size).float()


def recommend_all(model, data: MovieLensData, k: int, at: Optional[int], penalty: float, out: Path,
                  batch_size: int = 1024) -> None:
    """Every user's top-k after all their ratings, written to `out` (predictions.write_lists)."""
    users = torch.arange(data.metadata.num_users)
    unrated = data.metadata.num_movies - int(data.lengths.max())  # the fewest movies a user has not rated
    if k > unrated:
        raise UserError(f"-k {k} asks for more movies than the {unrated:,} that the most active user has not rated; "
                        f"give -k {unrated} or less")
    lists = torch.cat([recommend(model, data, users[start:start + batch_size], k, at, penalty)[0]
                       for start in range(0, len(users), batch_size)])
    write_lists(out, users, lists, data.metadata)
    print(f"wrote {out}: the top {k} of each of the {len(users):,} users after all their ratings")


def user_token(metadata: DatasetMetadata, user_id: int) -> int:
    try:
        return metadata.user_ids.index(user_id)
    except ValueError:
        raise UserError(f"user {user_id} is not in {metadata.name}; give a user id from "
                        f"{min(metadata.user_ids)} to {max(metadata.user_ids)}") from None


LAST_SECOND = 253402300799  # 9999-12-31 23:59:59 UTC, the last moment a date can name


def parse_time(text: str) -> int:
    """Seconds since 1970 of --at: a number of seconds, or an ISO date or date and time (UTC unless
    it names a zone), up to the year 9999."""
    try:
        seconds = int(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise UserError(f"--at {text!r} is neither seconds since 1970 nor an ISO date such as 2003-02-28 or "
                            "2003-02-28T17:30") from None
        seconds = int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())
    if not 0 <= seconds <= LAST_SECOND:
        raise UserError(f"--at {text} is out of range; give a moment from 1970 to the year 9999")
    return seconds


def utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def last_rating_times(data: MovieLensData, users: torch.Tensor) -> torch.Tensor:
    """The time of each user's last rating (its EOS slot carries it)."""
    return data.flat_times[data.offsets[users] + data.lengths[users]]


def request_time(at: Optional[str], model, data: MovieLensData, users: torch.Tensor) -> Optional[int]:
    """--at as a timestamp, checked: only a model with query time reads it, and never before a
    user's last rating (the model was trained on gaps forward in time)."""
    if at is None:
        return None
    if not model.config.query_time:
        raise UserError("--at: this model does not read the time of the request (its model_config.query_time is "
                        "false); leave --at out")
    seconds = parse_time(at)
    last = last_rating_times(data, users)
    if seconds < last.max():
        user = data.metadata.user_ids[int(users[last.argmax()])]
        raise UserError(f"--at {at} is before user {user}'s last rating ({utc(int(last.max()))}); give a later time")
    return seconds


def parse_arguments(argv: Optional[list[str]]):
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's folder (its best.pt), best.pt or last.pt")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="MovieLens user id")
    who.add_argument("--all-users", action="store_true", help="every user's top k, written to --out")
    parser.add_argument("--out", type=Path, metavar="CSV", help="with --all-users: the CSV file to write")
    parser.add_argument("-k", type=int, default=10, help="movies to recommend")
    parser.add_argument("--png", type=Path, help="save the row of cards here")
    parser.add_argument("--history", type=int, default=5, help="recent movies to show")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's)")
    parser.add_argument("--at", help="when the recommendation is asked for, for a model with query time: seconds "
                                     "since 1970 or an ISO date (UTC); default: the moment of each user's last rating")
    parser.add_argument("--popularity-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="rank by the score less LAMBDA x log(1 + the movie's ratings) (default 0: off)")
    args = parser.parse_args(argv)
    args.checkpoint = checkpoint_of(args.checkpoint)
    if args.k < 1 or args.history < 0 or not math.isfinite(args.popularity_penalty):
        parser.error("-k must be at least 1, --history at least 0 and --popularity-penalty a finite number")
    if args.all_users != (args.out is not None) or (args.all_users and args.png):
        parser.error("--all-users writes to --out (and draws no --png); --out goes with --all-users")
    return args


def main(argv: Optional[list[str]] = None) -> list[tuple[int, str, str, float]]:
    args = parse_arguments(argv)
    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint), str(args.checkpoint))
    inputs = inputs_of(args.checkpoint, args.data_dir or config.trainer_config.data_dir)
    refuse_to_overwrite(args.png, "--png", inputs)
    refuse_to_overwrite(args.out, "--out", inputs)
    token = None if args.all_users else user_token(metadata, args.user)
    data = data_for_checkpoint(config, metadata, args.data_dir)
    users = torch.arange(metadata.num_users) if args.all_users else torch.tensor([token])
    at = request_time(args.at, model, data, users)
    if args.all_users:
        recommend_all(model, data, args.k, at, args.popularity_penalty, args.out)
        return []
    return recommend_one(args, model, data, token, at)


def recommend_one(args, model, data: MovieLensData, token: int, at: Optional[int]) -> list[tuple[int, str, str, float]]:
    """Print the user's recent history and top k (and draw --png); (id, title, genres, p) per movie."""
    metadata = data.metadata
    movies, ratings = data.history(token)
    unrated = metadata.num_movies - len(set(movies.tolist()))
    if args.k > unrated:
        raise UserError(f"-k {args.k} asks for more movies than the {unrated:,} that user {args.user} has not "
                        f"rated; give -k {unrated} or less")
    shown = min(args.history, len(movies))
    print(f"user {args.user}: {len(movies)} ratings; the last {shown}:")
    recent = movies[len(movies) - shown:].tolist()
    for movie, rating in zip(recent, ratings[len(movies) - shown:].tolist()):
        stars = f"{rating:g} star{'' if rating == 1 else 's'}"
        print(f"  {metadata.movie_ids[movie]:>6}  {stars:<8}  {metadata.titles[movie]}  [{metadata.genres[movie]}]")
    users = torch.tensor([token])
    tokens, scores = recommend(model, data, users, args.k, at, args.popularity_penalty)
    if model.config.query_time:
        print(f"asked at {utc(at)}" if at is not None else
              f"asked at {utc(int(last_rating_times(data, users)[0]))}, the user's last rating (--at sets another time)")
    penalty = f", ranked with popularity penalty {args.popularity_penalty:g}" if args.popularity_penalty else ""
    print(f"top {args.k} next movies (rated movies excluded{penalty}; p: the model's probability that it is the "
          "next movie rated):")
    result = []
    for rank, (movie, score) in enumerate(zip(tokens[0].tolist(), scores[0].tolist()), 1):
        result.append((metadata.movie_ids[movie], metadata.titles[movie], metadata.genres[movie], score))
        print(f"  {rank:>2}. {metadata.movie_ids[movie]:>6}  {metadata.titles[movie]}  "
              f"[{metadata.genres[movie]}]  p {score:.3f}")
    if args.png:
        from plots import CardRow, draw_cards  # here: matplotlib's second of loading only when drawn
        draw_cards([CardRow(f"user {args.user}", recent, tokens[0].tolist())], metadata, path=args.png)
        print(f"wrote {args.png}")
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
