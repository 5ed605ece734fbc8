"""What one training step is made of: the loss, the optimizer, the learning-rate schedule.

`batch_loss` is the loss: full-softmax cross-entropy over all movies, at the targets the batch
type names (one per window in the window mode, every trained position in the sequence mode).
speed.py decides how a step runs (compiled, bf16, as a CUDA graph); model_train.py loops.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from config import TrainerConfig

LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]


def batch_loss(model: torch.nn.Module, batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(mean cross-entropy, number of targets) of a data.Batch or a data.ChunkBatch."""
    logits, targets = batch.logits_and_targets(model)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing), batch.num_targets()


def make_optimizer(model: torch.nn.Module, tc: TrainerConfig, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW, fused into one kernel per step on CUDA and CPU. capturable: for a CUDA
    graph, with the learning rate a tensor on the device so that the schedule can change it."""
    if tc.optimizer not in ("adam", "adamw"):
        raise ValueError(f"trainer_config.optimizer must be adam or adamw, got {tc.optimizer!r}")
    kind = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    lr = torch.tensor(tc.learning_rate, device=device) if capturable else tc.learning_rate
    return kind(model.parameters(), lr=lr, weight_decay=tc.weight_decay, fused=device.type in ("cuda", "cpu"),
                capturable=capturable)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping a tensor learning rate the same tensor on its device
    (where a CUDA graph reads it) with the saved value."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(rate, torch.Tensor):
            rate.fill_(float(group["lr"]))
            group["lr"] = rate


def make_schedule(optimizer: torch.optim.Optimizer, tc: TrainerConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay over num_epochs."""
    if tc.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"trainer_config.lr_schedule must be constant or cosine, got {tc.lr_schedule!r}")
    total = max(tc.num_epochs * steps_per_epoch - tc.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.lr_schedule == "constant":
            return 1.0
        progress = min((step - tc.warmup_steps) / total, 1.0)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # float base rates: a tensor learning rate (capturable optimizer) is then filled in place
    # each step without reading a device tensor back
    schedule.base_lrs = [tc.learning_rate] * len(optimizer.param_groups)
    return schedule


def backward_and_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: Optional[float]) -> None:
    """Gradients, clipped to grad_clip's global norm where set, then the optimizer step."""
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def train_step(loss_fn: LossFn, optimizer: torch.optim.Optimizer, batch, grad_clip: Optional[float] = None,
               schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """One optimisation step; returns (loss, targets) without a host sync."""
    loss, count = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    backward_and_update(loss, optimizer, grad_clip)
    if schedule:
        schedule.step()
    return loss.detach(), count
