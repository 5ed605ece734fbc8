"""Recommend next movies: python recommend.py --checkpoint PATH --user USER_ID [-k 10] [--png OUT.png]

Prints the user's recent history and the top-k movies that would come next (MovieLens id, title,
genres, the model's probability), with every movie the user has rated removed; --png draws the
row of cards (plots.draw_cards).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from checkpoint import data_for_checkpoint, inputs_of, load_checkpoint, model_from_checkpoint
from data import DatasetMetadata, MovieLensData, latest_windows, seen_mask
from errors import UserError, argument_parser, run_script
from files import refuse_to_overwrite
from plots import CardRow, draw_cards
from ranking import model_scorer


@torch.inference_mode()
def recommend(model, data: MovieLensData, users: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k tokens, probabilities) per user after all of each user's ratings, rated movies
    removed: the model's softmax over the movies the user has not rated."""
    batch = latest_windows(data, users, model.config.transformer_config.context_window_size)
    scores = model_scorer(model)(batch).masked_fill(seen_mask(data, batch), float("-inf"))
    top = scores.softmax(dim=1).topk(k, dim=1)
    return top.indices, top.values


def user_token(metadata: DatasetMetadata, user_id: int) -> int:
    try:
        return metadata.user_ids.index(user_id)
    except ValueError:
        raise UserError(f"user {user_id} is not in {metadata.name}; give a user id from "
                        f"{min(metadata.user_ids)} to {max(metadata.user_ids)}") from None


def main(argv: Optional[list[str]] = None) -> list[tuple[int, str, str, float]]:
    parser = argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt or last.pt")
    parser.add_argument("--user", type=int, required=True, help="MovieLens user id")
    parser.add_argument("-k", type=int, default=10, help="movies to recommend")
    parser.add_argument("--png", type=Path, help="save the row of cards here")
    parser.add_argument("--history", type=int, default=5, help="recent movies to show")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.k < 1 or args.history < 0:
        parser.error("-k must be at least 1 and --history at least 0")

    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint))
    refuse_to_overwrite(args.png, "--png", inputs_of(args.checkpoint, config, args.data_dir))
    token = user_token(metadata, args.user)
    data = data_for_checkpoint(config, metadata, args.data_dir)
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
    tokens, scores = recommend(model, data, torch.tensor([token]), args.k)
    print(f"top {args.k} next movies (rated movies excluded; p: the model's probability that it is the next "
          "movie rated):")
    result = []
    for rank, (movie, score) in enumerate(zip(tokens[0].tolist(), scores[0].tolist()), 1):
        result.append((metadata.movie_ids[movie], metadata.titles[movie], metadata.genres[movie], score))
        print(f"  {rank:>2}. {metadata.movie_ids[movie]:>6}  {metadata.titles[movie]}  "
              f"[{metadata.genres[movie]}]  p {score:.3f}")
    if args.png:
        draw_cards([CardRow(f"user {args.user}", recent, tokens[0].tolist())], metadata, path=args.png)
        print(f"wrote {args.png}")
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
