"""Time the repo's pipeline against a post-style pipeline built from the same classes, in one run.

    python benchmarks/bench.py --data-dir data/ml-1m [--device cpu|cuda] [--json OUT]

Stages: reading ratings alone, loading (read + tokenize + order + split + windows; cold and from
the cache), training throughput of the default (post's) model at batch 512, full-ranking
leave-one-out evaluation with history excluded (the trainer's validation path, compiled where its
training is: eval_first_s is the first pass, compilation included), and the peak memory of a
training process. The post-style path uses pandas' python-engine read, per-user Python window
building, a DataLoader over __getitem__, and a per-row filtering loop in evaluation. Ratios are
the claims: absolute times vary with the machine's load.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build import build_model, make_datasets, pick_device  # noqa: E402
from config import Config, load_config  # noqa: E402
from errors import run_script  # noqa: E402
from measure import peak_rss_of_this_process  # noqa: E402
from data import MovieLensSequenceDataset, WindowBatch, load_movielens, tokenize  # noqa: E402
from ranking import Scorer, markdown_table, model_scorer, rank_all, ranker  # noqa: E402
from releases import FORMATS, RATING_COLUMNS, detect_format, read_ratings  # noqa: E402
from speed import Step, speed_settings  # noqa: E402
from training import make_loss, make_optimizer, make_schedule, make_training_step  # noqa: E402

BATCH = 512


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_rate(train: Callable[[int], float], steps: int, repeats: int) -> float:
    """Median samples/s of `train(steps)` over repeats, after 10 warm-up (and compilation) steps."""
    train(10)
    return statistics.median(train(steps) for _ in range(repeats))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- loading

def load_fast(config: Config, data_dir: Path, cache: bool) -> dict[str, MovieLensSequenceDataset]:
    return make_datasets(config, load_movielens(data_dir, cache=cache))


def read_post_style(data_dir: Path) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(name, users, movies, ratings) read as the post did, with pandas' python engine, for any
    layout of releases.FORMATS."""
    name = detect_format(data_dir)
    fmt = FORMATS[name]

    def read(file: str, sep: str, header: Optional[str], names: list[str]) -> pd.DataFrame:
        # ISO-8859-1 decodes every file (titles of the UTF-8 releases come out garbled: unused here)
        frame = pd.read_csv(data_dir / file, sep=sep, engine="python", header=0 if header else None,
                            encoding="ISO-8859-1", quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE)
        return frame.iloc[:, :len(names)].set_axis(names, axis=1)
    ratings = read(fmt.ratings, fmt.ratings_separator, fmt.ratings_header, RATING_COLUMNS)
    movies = read(fmt.movies, fmt.separator, fmt.movies_header, ["movie_id", "title"])
    movies["genres"] = ""  # the post's model never reads them
    users = (read(fmt.users, fmt.separator, None, ["user_id"]) if fmt.users
             else pd.DataFrame({"user_id": ratings.user_id.unique()}))
    return name, users, movies, ratings


def load_post_style(data_dir: Path, context_window_size: int = 5) -> tuple[torch.Tensor, ...]:
    """The post's read-and-build: python-engine reads, per-user lists, iterrows + unfold; inputs,
    targets and users of a random 90% of the windows."""
    name, users, movies, ratings = read_post_style(data_dir)
    meta = tokenize(name, users, movies, ratings.iloc[:0]).metadata
    user_token = {u: i for i, u in enumerate(meta.user_ids)}
    movie_token = {m: i for i, m in enumerate(meta.movie_ids)}
    ratings["u"] = ratings.user_id.map(user_token)
    ratings["m"] = ratings.movie_id.map(movie_token)
    ordered = ratings.sort_values("timestamp").groupby("u")[["m", "rating"]].agg(list).reset_index()
    xs, ys, us = [], [], []
    for _, row in ordered.iterrows():
        seq = torch.tensor([meta.sos, *row.m, meta.eos])
        windows = seq.unfold(0, context_window_size, 1)
        xs.append(windows[:-1])
        ys.append(windows[1:, -1])
        us.extend([row.u] * (len(windows) - 1))
    x, y, u = torch.cat(xs), torch.cat(ys), torch.tensor(us)
    keep = torch.rand(len(x), generator=torch.Generator().manual_seed(0)) <= 0.9
    return x[keep], y[keep], u[keep]


# ----------------------------------------------------------------------------- training

def trainer_step(model, config: Config, dataset, device: torch.device) -> Step:
    """The trainer's training step for this model: its optimizer, schedule and loss, at the
    trainer's speed settings."""
    tc = config.trainer_config
    speed = speed_settings(tc, device, dataset.batch_shapes)
    optimizer = make_optimizer(model, tc, device, capturable=speed.cuda_graph)
    schedule = make_schedule(optimizer, tc, dataset.num_batches(tc.batch_size))
    return make_training_step(model, make_loss(tc, dataset), optimizer, schedule, tc, speed, device)


def train_fast(step_fn, dataset, steps: int, device: torch.device) -> float:
    """Samples/s of the repo's path: shuffled index slices of tensors already on the device, the
    trainer's step."""
    generator = torch.Generator().manual_seed(0)
    batches = dataset.batches(BATCH, shuffle=True, generator=generator)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(next(batches))
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def train_post_style(model, optimizer, dataset, steps: int, device: torch.device) -> float:
    """Samples/s of the post's path: a DataLoader collating single samples, copied per step,
    the model eager in float32, the default Adam, the loss read back every step."""
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        movie_tokens, ratings, users, target_tokens, target_ratings = (t.to(device) for t in next(loader))
        no_times = torch.zeros_like(movie_tokens)  # the post's model reads no time
        logits = model(WindowBatch(movie_tokens, ratings, no_times, users, target_tokens, target_ratings, no_times[:, 0],
                                   history_length=torch.full_like(users, movie_tokens.shape[1])))
        loss = F.cross_entropy(logits, target_tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the post logged every step
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- evaluation

def eval_fast(scorer: Scorer, dataset, compiled: bool, passes: int = 1) -> float:
    """Users/s of the trainer's validation path over `passes` passes: batches of 1024, compiled
    where training is."""
    start = time.perf_counter()
    for _ in range(passes):
        rank_all(scorer, dataset, batch_size=1024, compiled=compiled)
    return passes * len(dataset) / (time.perf_counter() - start)


def drop_seen_per_row(scores: torch.Tensor, batch, dataset, k: int) -> list[torch.Tensor]:
    """The post's de-duplication loop: a top list long enough to survive it, then per row,
    unique-with-counts of top list and history."""
    top = scores.topk(k + int(batch.history_length.max()) + 2, dim=1).indices.cpu()
    kept = []
    for row in range(len(top)):
        seen = dataset.data.history(int(batch.user_tokens[row]))[0][:int(batch.history_length[row])]
        merged, counts = torch.cat((top[row], seen)).unique(return_counts=True)
        kept.append(top[row][torch.isin(top[row], merged[counts > 1], invert=True)][:k])
    return kept


@torch.inference_mode()
def eval_post_style(model, dataset, k: int = 10) -> float:
    """Users/s of the post's evaluation shape: the model eager in batches, then a loop per row."""
    scorer = model_scorer(model)
    start = time.perf_counter()
    for batch in dataset.batches(512):
        for row, kept in enumerate(drop_seen_per_row(scorer(batch), batch, dataset, k)):
            int((kept == batch.target_tokens[row].cpu()).any())
    return len(dataset) / (time.perf_counter() - start)


@torch.inference_mode()
def ranking_stage(model, dataset, compiled: bool, k: int = 10) -> tuple[float, float]:
    """Users/s of exclusion + ranking alone, on the same precomputed scores: (repo, per-row loop)."""
    batches = list(dataset.batches(1024))
    scorer = model_scorer(model)
    scores = [scorer(b) for b in batches]
    rank = ranker(compiled)
    start = time.perf_counter()
    for batch, s in zip(batches, scores):
        rank(s, batch.target_tokens, dataset.seen_mask(batch))
    fast = len(dataset) / (time.perf_counter() - start)
    start = time.perf_counter()
    for batch, s in zip(batches, scores):
        drop_seen_per_row(s, batch, dataset, k)
    return fast, len(dataset) / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- memory

def memory_probe(data_dir: Path, style: str, config: Config, device: torch.device, steps: int) -> float:
    """Peak RSS (MB) of a process that loads ML-1M and trains `steps` steps one way."""
    torch.manual_seed(0)
    if style == "post":
        x, y, u = load_post_style(data_dir)
        dataset = torch.utils.data.TensorDataset(x, x, u, y, y)
        model = build_model(config, load_movielens(data_dir, cache=False).metadata).to(device)
        train_post_style(model, torch.optim.Adam(model.parameters(), lr=1e-3), dataset, steps, device)
    else:
        dataset = load_fast(config, data_dir, cache=True)["train"].to(device)
        model = build_model(config, dataset.metadata).to(device)
        train_fast(trainer_step(model, config, dataset, device), dataset, steps, device)
    return peak_rss_of_this_process()


def peak_rss(data_dir: Path, style: str, device: str, steps: int, overrides: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, "--data-dir", str(data_dir), "--device", device,
                          "--memory-probe", style, "--train-steps", str(steps),
                          *(a for o in overrides for a in ("--set", o))],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override training_config.yaml for the repo's path, e.g. trainer_config.bf16=false")
    parser.add_argument("--memory-probe", choices=("fast", "post"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    config = load_config(overrides=args.overrides)
    if args.memory_probe:
        print(memory_probe(args.data_dir, args.memory_probe, config, device, args.train_steps))
        return
    torch.manual_seed(0)

    ours, ref = {}, {}
    fmt = FORMATS[detect_format(args.data_dir)]
    ratings = args.data_dir / fmt.ratings
    ours["read_ratings_s"] = median_time(lambda: read_ratings(ratings, fmt), args.repeats)
    ref["read_ratings_s"] = median_time(lambda: pd.read_csv(ratings, sep=fmt.ratings_separator, engine="python",
                                                            header=0 if fmt.ratings_header else None),
                                        max(1, args.repeats - 1), warmup=0)
    ours["load_s"] = median_time(lambda: load_fast(config, args.data_dir, cache=False), args.repeats)
    ours["load_cached_s"] = median_time(lambda: load_fast(config, args.data_dir, cache=True), args.repeats)
    ref["load_s"] = median_time(lambda: load_post_style(args.data_dir), max(1, args.repeats - 1), warmup=0)
    ref["load_cached_s"] = ref["load_s"]  # the post has no cache

    datasets = load_fast(config, args.data_dir, cache=True)
    train_set = datasets["train"].to(device)
    cpu_train = load_fast(config, args.data_dir, True)["train"]
    post_train = torch.utils.data.TensorDataset(cpu_train.movie_tokens, cpu_train.ratings, cpu_train.user_tokens,
                                                cpu_train.target_tokens, cpu_train.target_ratings)  # the post's lists
    torch.manual_seed(0)
    model = build_model(config, train_set.metadata).to(device)
    step_fn = trainer_step(model, config, train_set, device)
    ours["train_samples_per_s"] = median_rate(lambda steps: train_fast(step_fn, train_set, steps, device),
                                              args.train_steps, args.repeats)
    torch.manual_seed(0)
    model = build_model(config, train_set.metadata).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref["train_samples_per_s"] = median_rate(lambda steps: train_post_style(model, optimizer, post_train, steps, device),
                                             args.train_steps, args.repeats)
    for result in (ours, ref):
        result["train_epoch_s"] = len(train_set) / result["train_samples_per_s"]

    test_set = datasets["test"].to(device)
    model.eval()
    speed = speed_settings(config.trainer_config, device, train_set.batch_shapes)
    compiled = speed.compile
    scorer = model_scorer(model, compiled)
    ours["eval_first_s"] = len(test_set) / eval_fast(scorer, test_set, compiled)  # compilation included
    # a pass takes tens of milliseconds: each timed run makes 5, as a training run makes 50 steps
    ours["eval_users_per_s"] = statistics.median(eval_fast(scorer, test_set, compiled, passes=5)
                                                 for _ in range(args.repeats))
    ref["eval_users_per_s"] = eval_post_style(model, test_set)
    ref["eval_first_s"] = len(test_set) / ref["eval_users_per_s"]  # its only run
    stages = [ranking_stage(model, test_set, compiled) for _ in range(args.repeats)]
    ours["rank_users_per_s"] = statistics.median(s[0] for s in stages)
    ref["rank_users_per_s"] = statistics.median(s[1] for s in stages)

    ours["peak_rss_mb"] = peak_rss(args.data_dir, "fast", args.device, args.train_steps, args.overrides)
    ref["peak_rss_mb"] = peak_rss(args.data_dir, "post", args.device, args.train_steps, args.overrides)

    lower_is_better = {"read_ratings_s", "load_s", "load_cached_s", "train_epoch_s", "eval_first_s",
                       "peak_rss_mb"}
    ratios = {k: (ref[k] / ours[k] if k in lower_is_better else ours[k] / ref[k]) for k in ours}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"{args.data_dir} on {name} ({speed}); ratio = how many times better than the post-style path")
    print(markdown_table(["stage", "repo", "post-style", "ratio"],
                         [[key, f"{ours[key]:,.3f}", f"{ref[key]:,.3f}", f"{ratios[key]:.1f}x"] for key in ours]))
    if args.json:
        args.json.write_text(json.dumps({**ours, "device": name, "reference": ref, "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    sys.exit(run_script(main))
