"""Every figure the scripts and notebooks draw: training curves, metric bars, recommendation cards.

Each function saves its figure to `path` (and closes it) when given one, else returns it for a
notebook to show. Cards show posters from data/posters/<movie_id>.jpg when that folder has them,
else cards drawn from title, year and genres.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from loguru import logger
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch
from matplotlib.ticker import MaxNLocator

from data import DatasetMetadata
from files import atomic_write
from run import TRAIN_LOSS, VALIDATION_LOSS, VALIDATION_NDCG


def save_or_return(fig: Figure, path: Optional[Path]) -> Optional[Figure]:
    """Save a figure to path and close it, or return it for a notebook to show."""
    if path is None:
        return fig
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def plot_training_curves(scalars: pd.DataFrame, path: Optional[Path] = None):
    """Training and validation loss and validation NDCG@10 per epoch, from a run's TensorBoard
    scalars (run.Run.scalars). Saved to path and closed when a path is given, else returned."""
    fig, (loss_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for tag, label in ((TRAIN_LOSS, "train"), (VALIDATION_LOSS, "validation")):
        rows = scalars[scalars.tag == tag]
        loss_ax.plot(rows.step, rows.value, label=label, marker="o" if len(rows) < 20 else None)  # one epoch shows
    loss_ax.set(title="cross-entropy", xlabel="epoch")
    loss_ax.legend()
    rows = scalars[scalars.tag == VALIDATION_NDCG]
    ndcg_ax.plot(rows.step, rows.value, marker="o", color="C2")
    ndcg_ax.set(title="validation NDCG@10", xlabel="epoch")
    for ax in (loss_ax, ndcg_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    fig.tight_layout()
    return save_or_return(fig, path)


def plot_results(results: dict[str, dict[str, float]], ks: tuple[int, ...], path: Optional[Path] = None,
                 metrics: tuple[str, ...] = ("hr", "ndcg", "mrr")):
    """Bar chart of each scorer per metric and K; saved to path (and closed) when given."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    width = 0.8 / len(results)
    for ax, metric in zip(axes[0], metrics):
        for i, (name, values) in enumerate(results.items()):
            ax.bar([j + i * width for j in range(len(ks))], [values[f"{metric}@{k}"] for k in ks],
                   width, label=name)
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(ks))], [f"@{k}" for k in ks])
        ax.set_title(metric.upper())
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_or_return(fig, path)


def plot_penalty_sweep(sweep: list[dict[str, float]], results: dict[str, dict[str, float]], k: int,
                       path: Optional[Path] = None):
    """eval.py --penalty-sweep: NDCG@K against coverage@K and against long-tail@K, a point per
    popularity penalty (labelled), the popularity baselines as reference points."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, what in zip(axes, ("coverage", "long-tail")):
        ax.plot([row[what] for row in sweep], [row["ndcg"] for row in sweep], "o-", label="model")
        for row in sweep:
            ax.annotate(f"{row['penalty']:g}", (row[what], row["ndcg"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        for name, values in results.items():
            if name != "model" and f"{what}@{k}" in values:
                ax.plot(values[f"{what}@{k}"], values[f"ndcg@{k}"], "s", label=name)
        ax.set_xlabel(f"{what}@{k}")
        ax.set_ylabel(f"NDCG@{k}")
    axes[0].legend(fontsize=8)
    fig.suptitle("the popularity penalty: accuracy against the long tail (labels: LAMBDA)", fontsize=9)
    fig.tight_layout()
    return save_or_return(fig, path)


def plot_buckets(grouped: dict[str, dict], metric: str = "ndcg@10", path: Optional[Path] = None):
    """Each scorer's metric per group of targets (ranking.grouped_metrics) with its 95% interval
    as an error bar; each group labelled with its number of targets."""
    groups = [g for g, entry in grouped.items() if entry.get("results")]
    scorers = list(grouped[groups[0]]["results"])
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.4))
    width = 0.8 / len(scorers)
    for i, name in enumerate(scorers):
        values = [grouped[g]["results"][name][metric] for g in groups]
        low, high = zip(*(grouped[g]["intervals"][name][metric] for g in groups))
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name,
               yerr=[[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]], capsize=3)
    ax.set_xticks([j + width * (len(scorers) - 1) / 2 for j in range(len(groups))],
                  [textwrap.fill(f"{g} ({grouped[g]['targets']:,})", 18) for g in groups], fontsize=8)
    ax.set_ylabel(metric.upper())
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_or_return(fig, path)


POSTERS = Path("data/posters")
GENRE_COLOURS = {"Action": "#d62728", "Adventure": "#ff7f0e", "Animation": "#e377c2",
                 "Children's": "#f7b6d2", "Comedy": "#bcbd22", "Crime": "#7f7f7f",
                 "Documentary": "#8c564b", "Drama": "#1f77b4", "Fantasy": "#9467bd",
                 "Film-Noir": "#333333", "Horror": "#5b0f00", "Musical": "#dbdb8d",
                 "Mystery": "#393b79", "Romance": "#ff9896", "Sci-Fi": "#17becf",
                 "Thriller": "#843c39", "War": "#637939", "Western": "#bd9e39"}
OTHER_GENRE = "#555555"


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


def ink(colour: str) -> str:
    """Black or white text, whichever reads on a card of this colour (by its relative luminance)."""
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.55 else "white"


def read_poster(path: Path) -> Optional[np.ndarray]:
    """The poster at path; None where there is none, or where it cannot be read (a damaged or
    mislabelled file: a warning names it, and its card is drawn without it)."""
    if not path.is_file():
        return None
    try:
        return iio.imread(path, plugin="pillow")
    except Exception as e:  # imageio reports a bad image as one of several error types
        logger.warning(f"cannot read the poster {path} ({type(e).__name__}): its card is drawn without it")
        return None


def _draw_card(ax, metadata: DatasetMetadata, token: int, posters: Path, border: str,
               width: float) -> Optional[str]:
    """One movie's card: its poster, else a card coloured by its first genre; returns that genre
    (None for a poster), for the legend."""
    ax.set_xticks([])
    ax.set_yticks([])
    movie_id = metadata.movie_ids[token]
    poster = posters / f"{movie_id}.jpg"
    title, year = split_title(metadata.titles[token])
    genres = metadata.genres[token].split("|")
    for spine in ax.spines.values():
        spine.set_edgecolor(border)
        spine.set_linewidth(width)
    image = read_poster(poster)
    if image is not None:
        ax.imshow(image)
        return None
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.5)
    colour = GENRE_COLOURS.get(genres[0], OTHER_GENRE)
    text = ink(colour)
    ax.add_patch(FancyBboxPatch((0.04, 0.04), 0.92, 1.42, boxstyle="round,pad=0,rounding_size=0.06",
                                facecolor=colour, edgecolor="none"))
    ax.text(0.5, 1.05, "\n".join(textwrap.wrap(title, 12)[:5]), ha="center", va="center",
            color=text, fontsize=7, fontweight="bold")
    ax.text(0.5, 0.45, year, ha="center", va="center", color=text, fontsize=9)
    ax.text(0.5, 0.2, "\n".join(genres[:2]), ha="center", va="center", color=text, fontsize=6)
    return genres[0] if genres[0] in GENRE_COLOURS else "other"


def draw_cards(rows: list[CardRow], metadata: DatasetMetadata, posters: Path = POSTERS,
               path: Optional[Path] = None) -> Figure:
    """A row of cards per user: the last movies seen (grey), then the recommendations (blue),
    the held-out movie in green where it was recommended. Saved to path (and closed) when given."""
    columns = max(len(r.history) + len(r.recommendations) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 2.2 * len(rows) + 0.5), squeeze=False)
    shown: set[Optional[str]] = set()
    for ax_row, row in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for i, token in enumerate(row.history):
            ax_row[i].axis("on")
            shown.add(_draw_card(ax_row[i], metadata, token, posters, "#999999", 1.5))
        ax_row[len(row.history)].text(0.5, 0.5, "→", ha="center", va="center", fontsize=22,
                                      transform=ax_row[len(row.history)].transAxes)
        for rank, token in enumerate(row.recommendations, 1):
            ax = ax_row[len(row.history) + rank]
            ax.axis("on")
            hit = token == row.held_out
            shown.add(_draw_card(ax, metadata, token, posters, "#2ca02c" if hit else "#1f77b4", 5 if hit else 1.5))
            ax.set_title(f"#{rank}" + (" held out ✓" if hit else ""), fontsize=8,
                         color="#2ca02c" if hit else "black")
        ax_row[0].set_ylabel(row.label, fontsize=9)
        ax_row[0].set_title("history (last)", fontsize=8, loc="left")
    genres = [g for g in [*GENRE_COLOURS, "other"] if g in shown]
    if genres:  # what the colours of the drawn cards mean
        fig.legend(handles=[Patch(color=GENRE_COLOURS.get(g, OTHER_GENRE), label=g) for g in genres],
                   loc="lower center", ncol=min(len(genres), 9), fontsize=7, frameon=False,
                   title="card colour: first genre", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.12 if genres else 0, 1, 1))
    return save_or_return(fig, path)
