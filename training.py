"""One training step, read top to bottom: the loss of the model on a batch, the optimizer and its
learning-rate schedule, and make_training_step, which joins them and applies speed.py's wrappers.

The loss is cross-entropy over all movies at the batch's targets (one per window in the window
mode, every trained position in the sequence mode), from the model's last hidden layer and its
output weights (batch_loss). `make_loss` picks one of its three forms:
- full_softmax_loss: the logits of every movie, the post's loss; with loss_chunk_rows, computed
  and recomputed for backward in row chunks, so that the [rows x movies] logits of a large
  catalog never exist at once (same value and gradients);
- sampled_softmax_loss: the target against num_negatives shared uniform negatives, or against
  the batch's other targets with logQ correction (HSTU, gSASRec), for catalogs where the full
  softmax is too slow.
With trainer_config.rating_weights, each target's term is weighed by the stars the user gave it
(weight_by_stars), as the post proposed: the loss is then the mean of weight x cross-entropy.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import speed
from config import TrainerConfig
from data import Batch
from distributed import weigh_by_targets
from speed import Step

# (hidden, output weight, targets, weights=each target's weight or None) -> the mean of weight x cross-entropy,
# as full_softmax_loss and make_loss's forms take them
Loss = Callable[..., torch.Tensor]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the random draws of one epoch's steps (dropout masks, sampled negatives) from the run's
    seed, the epoch and this process's rank. Each process under torchrun draws its own masks, and a
    resumed run draws what the uninterrupted one drew, on a GPU as on a CPU, with no random state
    to save."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def batch_loss(model: torch.nn.Module, batch: Batch, loss: Loss,
               star_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(mean loss, number of targets) of a data.Batch: the model's last hidden layer at the batch's
    predicting positions against its target movies; star_weights: each target's weight by its
    stars (rating_weights)."""
    hidden = model.hidden(batch)
    weights = None if star_weights is None else weight_by_stars(star_weights, batch.target_ratings)
    return loss(hidden, model.output_weight, batch.target_tokens, weights=weights), batch.num_targets


def weight_by_stars(star_weights: torch.Tensor, stars: torch.Tensor) -> torch.Tensor:
    """Each target's weight: star_weights[k - 1] for k stars, a half star taking the next whole
    star's (3.5 weighs as 4)."""
    return star_weights[(stars.ceil().long() - 1).clamp(0, len(star_weights) - 1)]


class ModelLoss(torch.nn.Module):
    """batch_loss as a module's forward, the form DistributedDataParallel wraps: its forward is
    what prepares the gradients' averaging over processes."""

    def __init__(self, model: torch.nn.Module, loss: Loss, star_weights: Optional[torch.Tensor] = None):
        super().__init__()
        self.model, self.loss, self.star_weights = model, loss, star_weights

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        return batch_loss(self.model, batch, self.loss, self.star_weights)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor],
                  label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy (mean or sum over targets), each target's term times its weight where
    weights are given."""
    if weights is None:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=reduction)
    terms = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none") * weights
    return terms.mean() if reduction == "mean" else terms.sum()


def full_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, target_tokens: torch.Tensor,
                      label_smoothing: float = 0.0,
                      chunk_rows: Optional[int] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weight.T (each term times its weight where given); in
    chunks of chunk_rows rows when given."""
    if chunk_rows is None or len(hidden) <= chunk_rows:
        return cross_entropy(F.linear(hidden, weight), target_tokens, weights, label_smoothing)

    def chunk_sum(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, k: Optional[torch.Tensor]) -> torch.Tensor:
        return cross_entropy(F.linear(h, w), t, k, label_smoothing, reduction="sum")
    total = sum(checkpoint(chunk_sum, hidden[i:i + chunk_rows], weight, target_tokens[i:i + chunk_rows],
                           None if weights is None else weights[i:i + chunk_rows], use_reentrant=False)
                for i in range(0, len(hidden), chunk_rows))
    return total / len(hidden)


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, target_tokens: torch.Tensor,
                         negatives: torch.Tensor,
                         log_q: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of each target against the shared negatives [K] (each term times its
    weight where given). log_q [vocab]: the log of each token's sampling rate, subtracted from its
    logit (logQ correction). A negative that is the row's own target is left out."""
    positive = (hidden * weight[target_tokens]).sum(-1, keepdim=True)
    negative = F.linear(hidden, weight[negatives])
    if log_q is not None:
        positive, negative = positive - log_q[target_tokens][:, None], negative - log_q[negatives][None, :]
    negative = negative.masked_fill(negatives[None, :] == target_tokens[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return cross_entropy(logits, torch.zeros_like(target_tokens), weights)


def make_loss(tc: TrainerConfig, train_set) -> Loss:
    """The configured loss for this training data (data.MovieLensSequenceDataset or
    data.HistoryChunks: its movie count, and for in-batch negatives how often each movie is a
    target, their sampling rate)."""
    if tc.loss == "full":
        return lambda h, w, t, weights=None: full_softmax_loss(h, w, t, tc.label_smoothing, tc.loss_chunk_rows, weights)
    if tc.negatives == "uniform":
        num_movies = train_set.metadata.num_movies
        return lambda h, w, t, weights=None: sampled_softmax_loss(
            h, w, t, torch.randint(0, num_movies, (tc.num_negatives,), device=t.device), weights=weights)
    counts = train_set.target_counts().double()
    log_q = torch.log(counts.clamp(min=1) / counts.sum()).float().to(train_set.device)  # moved once, not per step
    return lambda h, w, t, weights=None: sampled_softmax_loss(h, w, t, t, log_q, weights)


def star_weights(tc: TrainerConfig, device: torch.device) -> Optional[torch.Tensor]:
    """trainer_config.rating_weights as a tensor on device (one weight per star, 1 to 5), or None."""
    return None if tc.rating_weights is None else torch.tensor(tc.rating_weights, dtype=torch.float32, device=device)


def make_optimizer(model: torch.nn.Module, tc: TrainerConfig, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or AdamW, fused into one kernel per step on CUDA and CPU. capturable: for a CUDA
    graph, with the learning rate a tensor on the device so that the schedule can change it."""
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


def resume_optimizer(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                     checkpoint: dict, tc: TrainerConfig) -> None:
    """The optimizer's and the schedule's saved state, then this config's learning rate, weight
    decay and schedule in place of the saved ones: a run resumed with new values trains with them."""
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["schedule"])
    schedule.base_lrs = [tc.learning_rate] * len(optimizer.param_groups)
    rate = tc.learning_rate * schedule.lr_lambdas[0](schedule.last_epoch)
    for group in optimizer.param_groups:
        group["weight_decay"] = tc.weight_decay
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def make_schedule(optimizer: torch.optim.Optimizer, tc: TrainerConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay over num_epochs."""
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


def train_step(loss_fn: Step, optimizer: torch.optim.Optimizer, batch,
               grad_clip: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """One optimisation step, eager: loss, gradients (clipped to grad_clip's global norm where
    set), the optimizer's update. Returns (loss, targets) without a host sync."""
    loss, count = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return loss.detach(), count


def make_training_step(model: torch.nn.Module, loss: Loss, optimizer: torch.optim.Optimizer,
                       schedule: torch.optim.lr_scheduler.LRScheduler, tc: TrainerConfig, settings: speed.Speed,
                       device: torch.device, distributed: bool = False) -> Step:
    """The training step as the speed settings say, then one step of the schedule.

    Read from the inside out: the loss of the model on a batch; under torchrun through
    DistributedDataParallel (which averages the gradients), each process's gradient weighed by
    its share of the step's targets; in bf16 autocast; compiled for full batches; the eager
    train_step around it; on CUDA the whole step captured once and replayed as a CUDA graph."""
    loss_fn: Step = ModelLoss(model, loss, star_weights(tc, device))
    if distributed:
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = speed.in_bf16(loss_fn, device, settings.bf16)
    if settings.compile:
        loss_fn = speed.compiled_for_full_batches(loss_fn, tc.batch_size, device)
    if distributed:
        loss_fn = weighed_by_targets(loss_fn)

    def step(batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        return train_step(loss_fn, optimizer, batch, tc.grad_clip)
    if settings.cuda_graph:
        step = speed.replayed_as_cuda_graph(step, loss_fn, optimizer, tc.batch_size)

    def scheduled(batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        out = step(batch)
        schedule.step()
        return out
    return scheduled


def weighed_by_targets(loss_fn: Step) -> Step:
    """loss_fn with its gradient weighed by this process's share of the step's targets
    (distributed.weigh_by_targets)."""
    def weighed(batch):
        loss, count = loss_fn(batch)
        return weigh_by_targets(loss, count), count
    return weighed
