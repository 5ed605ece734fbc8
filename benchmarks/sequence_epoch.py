"""Time one epoch of the sequence mode and say how far it is from the machine's limit.

    python benchmarks/sequence_epoch.py --data-dir data/ml-1m [--config configs/ml1m_best.yaml]
                                        [--device cpu|cuda] [--steps N] [--set KEY=VALUE ...] [--json OUT]

Trains one epoch of the config (every batch, or the first --steps) with the trainer's own step
and reports training targets per second and seconds per epoch; the shares of the computed
positions (batches x padded length) that are real (not left padding) and that are trained; the
model's FLOPs over the same batches, counted by torch's FlopCounterMode on a second, untimed pass
(forward and backward); and those FLOPs per second against the FLOP/s of a large matmul
measured in the same run, in the training step's precision. A compiled step is first taken once
at each batch length, so that the time is an epoch's after the run's first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build import build_model, make_datasets, pick_device  # noqa: E402
from config import load_config  # noqa: E402
from errors import run_script  # noqa: E402
from speed import speed_settings  # noqa: E402
from training import ModelLoss, make_loss, make_optimizer, make_schedule, make_training_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a size x size matmul repeated for about `seconds`: the machine's practical peak."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    sync(device)
    return 2 * size ** 3 * n / (time.perf_counter() - start)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml1m_best.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="time only the epoch's first N batches (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_config(args.config, [*args.overrides, f"trainer_config.data_dir={args.data_dir}"])
    tc, device = config.trainer_config, pick_device(args.device)
    train_set = make_datasets(config)["train"].to(device)
    settings = speed_settings(tc, device, train_set.batch_shapes)
    torch.manual_seed(tc.seed)
    model = build_model(config, train_set.metadata).to(device).train()
    optimizer = make_optimizer(model, tc, device, capturable=settings.cuda_graph)
    schedule = make_schedule(optimizer, tc, train_set.num_batches(tc.batch_size))
    loss = make_loss(tc, train_set)
    step = make_training_step(model, loss, optimizer, schedule, tc, settings, device)
    batches = list(train_set.batches(tc.batch_size, shuffle=True, generator=torch.Generator().manual_seed(tc.seed)))
    batches = batches[:args.steps] if args.steps else batches

    # the first step allocates the optimizer's state; compiled, each batch length compiles once
    # per run, not per epoch, so one step of each is taken before the clock starts
    warm_up = {b.movie_tokens.shape: b for b in batches} if settings.compile else {0: batches[0]}
    for batch in warm_up.values():
        step(batch)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    seconds = time.perf_counter() - start

    computed = sum(b.predict.numel() for b in batches)
    real = sum(int((~b.padding_mask).sum()) for b in batches)
    trained = sum(int(b.predict.sum()) for b in batches)
    model_loss = ModelLoss(model, loss)
    with FlopCounterMode(display=False) as counter:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                model_loss(batch)[0].backward()
    flops = counter.get_total_flops()
    peak = matmul_flops_per_s(device, torch.bfloat16 if settings.bf16 else torch.float32)
    epoch_s = seconds * len(train_set) / trained
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "speed": str(settings), "batches": len(batches), "targets_per_s": trained / seconds,
              "epoch_s": epoch_s, "computed_positions": computed, "real_share": real / computed,
              "trained_share": trained / computed, "model_tflop": flops / 1e12,
              "model_tflop_per_epoch": flops / 1e12 * len(train_set) / trained,
              "model_flop_per_s": flops / seconds, "matmul_flop_per_s": peak, "fraction_of_matmul": flops / seconds / peak}
    print(f"{args.data_dir}, {Path(args.config).name} on {result['device']} ({settings}), {len(batches)} batches:")
    print(f"  {result['targets_per_s']:,.0f} training targets/s, {epoch_s:.1f} s per epoch "
          f"({len(train_set):,} targets)")
    print(f"  computed positions {computed:,}: {result['real_share']:.1%} real, {result['trained_share']:.1%} trained")
    print(f"  model {flops / seconds / 1e9:,.1f} GFLOP/s ({result['model_tflop_per_epoch']:.2f} TFLOP an epoch) "
          f"against a large matmul's {peak / 1e9:,.1f} GFLOP/s: {result['fraction_of_matmul']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
