"""Recommend next movies: python recommend.py --checkpoint PATH --user USER_ID [-k 10] [--png OUT.png]

Prints the user's recent history and the top-k movies that would come next (MovieLens id, title,
genres, score), with every movie the user has rated removed; --png draws the row of cards.
`draw_cards` is the one function that draws recommendation cards, for this command and the
notebooks: posters from data/posters/<movie_id>.jpg when that folder has them, else cards drawn
from title, year and genres.
"""
from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from data import DatasetMetadata, MovieLensData, latest_windows, seen_mask
from eval import model_scorer
from model_train import data_for_checkpoint, load_checkpoint, model_from_checkpoint, save_or_return

POSTERS = Path("data/posters")
GENRE_COLOURS = {"Action": "#d62728", "Adventure": "#ff7f0e", "Animation": "#e377c2",
                 "Children's": "#f7b6d2", "Comedy": "#bcbd22", "Crime": "#7f7f7f",
                 "Documentary": "#8c564b", "Drama": "#1f77b4", "Fantasy": "#9467bd",
                 "Film-Noir": "#333333", "Horror": "#5b0f00", "Musical": "#dbdb8d",
                 "Mystery": "#393b79", "Romance": "#ff9896", "Sci-Fi": "#17becf",
                 "Thriller": "#843c39", "War": "#637939", "Western": "#bd9e39"}


@dataclass
class CardRow:
    label: str
    history: list[int]            # movie tokens, oldest first
    recommendations: list[int]    # movie tokens, best first
    held_out: Optional[int] = None  # the true next movie, highlighted where recommended


def split_title(title: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995')."""
    match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    return (match.group(1), match.group(2)) if match else (title, "")


def _draw_card(ax, metadata: DatasetMetadata, token: int, posters: Path, border: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    movie_id = metadata.movie_ids[token]
    poster = posters / f"{movie_id}.jpg"
    title, year = split_title(metadata.titles[token])
    genres = metadata.genres[token].split("|")
    if poster.is_file():
        ax.imshow(iio.imread(poster))
    else:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.5)
        colour = GENRE_COLOURS.get(genres[0], "#555555")
        ax.add_patch(FancyBboxPatch((0.04, 0.04), 0.92, 1.42, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=colour, alpha=0.85, edgecolor="none"))
        ax.text(0.5, 1.05, "\n".join(textwrap.wrap(title, 12)[:5]), ha="center", va="center",
                color="white", fontsize=7, fontweight="bold")
        ax.text(0.5, 0.45, year, ha="center", va="center", color="white", fontsize=9)
        ax.text(0.5, 0.2, "\n".join(genres[:2]), ha="center", va="center", color="white", fontsize=6)
    for spine in ax.spines.values():
        spine.set_edgecolor(border)
        spine.set_linewidth(width)


def draw_cards(rows: list[CardRow], metadata: DatasetMetadata, posters: Path = POSTERS,
               path: Optional[Path] = None) -> Figure:
    """A row of cards per user: the last movies seen (grey), then the recommendations (blue),
    the held-out movie in green where it was recommended. Saved to path (and closed) when given."""
    columns = max(len(r.history) + len(r.recommendations) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 2.2 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for i, token in enumerate(row.history):
            ax_row[i].axis("on")
            _draw_card(ax_row[i], metadata, token, posters, "#999999", 1.5)
        ax_row[len(row.history)].text(0.5, 0.5, "→", ha="center", va="center", fontsize=22,
                                      transform=ax_row[len(row.history)].transAxes)
        for rank, token in enumerate(row.recommendations, 1):
            ax = ax_row[len(row.history) + rank]
            ax.axis("on")
            hit = token == row.held_out
            _draw_card(ax, metadata, token, posters, "#2ca02c" if hit else "#1f77b4", 5 if hit else 1.5)
            ax.set_title(f"#{rank}" + (" held out ✓" if hit else ""), fontsize=8,
                         color="#2ca02c" if hit else "black")
        ax_row[0].set_ylabel(row.label, fontsize=9)
        ax_row[0].set_title("history (last)", fontsize=8, loc="left")
    fig.tight_layout()
    return save_or_return(fig, path)


@torch.inference_mode()
def recommend(model, data: MovieLensData, users: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k tokens, scores) per user after all of each user's ratings, rated movies removed."""
    batch = latest_windows(data, users, model.config.transformer_config.context_window_size)
    scores = model_scorer(model)(batch).masked_fill(seen_mask(data, batch), float("-inf"))
    top = scores.topk(k, dim=1)
    return top.indices, top.values


def user_token(metadata: DatasetMetadata, user_id: int) -> int:
    try:
        return metadata.user_ids.index(user_id)
    except ValueError:
        raise SystemExit(f"user {user_id} is not in {metadata.name} (user ids run from "
                         f"{min(metadata.user_ids)} to {max(metadata.user_ids)})") from None


def main(argv: Optional[list[str]] = None) -> list[tuple[int, str, str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--user", type=int, required=True, help="MovieLens user id")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--png", type=Path, help="save the row of cards here")
    parser.add_argument("--history", type=int, default=5, help="recent movies to show")
    parser.add_argument("--data-dir", help="MovieLens folder (default: the checkpoint's)")
    args = parser.parse_args(argv)

    model, config, metadata = model_from_checkpoint(load_checkpoint(args.checkpoint))
    token = user_token(metadata, args.user)
    data = data_for_checkpoint(config, metadata, args.data_dir)
    movies, ratings = data.history(token)
    print(f"user {args.user}: {len(movies)} ratings; the last {min(args.history, len(movies))}:")
    recent = movies[-args.history:].tolist()
    for movie, rating in zip(recent, ratings[-args.history:].tolist()):
        print(f"  {metadata.movie_ids[movie]:>6}  {'*' * rating:<5}  {metadata.titles[movie]}  [{metadata.genres[movie]}]")
    tokens, scores = recommend(model, data, torch.tensor([token]), args.k)
    print(f"top {args.k} next movies (rated movies excluded):")
    result = []
    for rank, (movie, score) in enumerate(zip(tokens[0].tolist(), scores[0].tolist()), 1):
        result.append((metadata.movie_ids[movie], metadata.titles[movie], metadata.genres[movie], score))
        print(f"  {rank:>2}. {metadata.movie_ids[movie]:>6}  {metadata.titles[movie]}  "
              f"[{metadata.genres[movie]}]  score {score:.3f}")
    if args.png:
        draw_cards([CardRow(f"user {args.user}", recent, tokens[0].tolist())], metadata, path=args.png)
        print(f"cards saved to {args.png}")
    return result


if __name__ == "__main__":
    main()
