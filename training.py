"""What one training step is made of: the loss, the optimizer, the learning-rate schedule.

The loss is cross-entropy over all movies at the targets the batch type names (one per window
in the window mode, every trained position in the sequence mode), from the model's last hidden
layer and its output weights. `make_loss` picks one of three forms of it:
- full_softmax_loss: the logits of every movie, the post's loss; with loss_chunk_rows, computed
  and recomputed for backward in row chunks, so that the [rows x movies] logits of a large
  catalog never exist at once (same value and gradients);
- sampled_softmax_loss: the target against num_negatives shared uniform negatives, or against
  the batch's other targets with logQ correction (HSTU, gSASRec), for catalogs where the full
  softmax is too slow.
speed.py decides how a step runs (compiled, bf16, as a CUDA graph); model_train.py loops.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from config import TrainerConfig

LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, weight, targets) -> mean


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the random draws of one epoch's steps (dropout masks, sampled negatives) from the run's
    seed, the epoch and this process's rank. Each process under torchrun draws its own masks, and a
    resumed run draws what the uninterrupted one drew, on a GPU as on a CPU, with no random state
    to save."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def batch_loss(model: torch.nn.Module, batch, loss: Loss) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(mean loss, number of targets) of a data.Batch or a data.ChunkBatch."""
    hidden, targets = batch.hidden_and_targets(model)
    return loss(hidden, model.output_weight, targets), batch.num_targets()


class ModelLoss(torch.nn.Module):
    """batch_loss as a module's forward, the form DistributedDataParallel wraps: its forward is
    what prepares the gradients' averaging over processes."""

    def __init__(self, model: torch.nn.Module, loss: Loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        return batch_loss(self.model, batch, self.loss)


def full_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                      chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weight.T; in chunks of chunk_rows rows when given."""
    if chunk_rows is None or len(hidden) <= chunk_rows:
        return F.cross_entropy(F.linear(hidden, weight), targets, label_smoothing=label_smoothing)

    def chunk_sum(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w), t, label_smoothing=label_smoothing, reduction="sum")
    total = sum(checkpoint(chunk_sum, hidden[i:i + chunk_rows], weight, targets[i:i + chunk_rows], use_reentrant=False)
                for i in range(0, len(hidden), chunk_rows))
    return total / len(hidden)


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of each target against the shared negatives [K]. log_q [vocab]: the log
    of each token's sampling rate, subtracted from its logit (logQ correction). A negative that is
    the row's own target is left out."""
    positive = (hidden * weight[targets]).sum(-1, keepdim=True)
    negative = F.linear(hidden, weight[negatives])
    if log_q is not None:
        positive, negative = positive - log_q[targets][:, None], negative - log_q[negatives][None, :]
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def make_loss(tc: TrainerConfig, train_set) -> Loss:
    """The configured loss for this training data (data.MovieLensSequenceDataset or
    data.SequenceChunks: its movie count, and for in-batch negatives how often each movie is a
    target, their sampling rate)."""
    if tc.loss == "full":
        return lambda h, w, t: full_softmax_loss(h, w, t, tc.label_smoothing, tc.loss_chunk_rows)
    if tc.negatives == "uniform":
        num_movies = train_set.metadata.num_movies
        return lambda h, w, t: sampled_softmax_loss(
            h, w, t, torch.randint(0, num_movies, (tc.num_negatives,), device=t.device))
    counts = train_set.target_counts().double()
    log_q = torch.log(counts.clamp(min=1) / counts.sum()).float().to(train_set.device)  # moved once, not per step
    return lambda h, w, t: sampled_softmax_loss(h, w, t, t, log_q)


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
