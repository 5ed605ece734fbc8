"""Training on several processes with `torchrun`: PyTorch's DistributedDataParallel, nothing else.

    torchrun --nproc_per_node=N model_train.py [--config ...]

Every process loads the data and builds the model; DistributedDataParallel copies rank 0's
weights to all and averages the gradients of each step. Each process takes its share of each
epoch's shuffled batches (the same shuffle everywhere, so N processes at batch b step through
the batches one process at batch N x b would) and draws its own dropout masks
(training.seed_epoch). Validation is split between the processes and its ranks gathered, so the
metrics are those of one process. Rank 0 alone logs, writes TensorBoard and checkpoints. Without
torchrun (WORLD_SIZE unset) this is one process, as usual.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from build import pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of a run."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world > 1


def torchrun_world() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device_name: str) -> tuple[Group, torch.device]:
    """Join torchrun's process group where there is one (NCCL, each process on its LOCAL_RANK's
    GPU; gloo on CPUs); the group and this process's device."""
    world = torchrun_world()
    device = pick_device(device_name)
    if world == 1:
        return Group(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), world), device


def wait_for_all(group: Group) -> None:
    """Every process waits here for the others (rank 0 still writing its plots, say), so that none
    leaves the group while another is inside it."""
    if group.is_distributed:
        dist.barrier()


def stop(group: Group) -> None:
    if group.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; under torchrun, without Python's interpreter shutdown.

    DistributedDataParallel keeps the gloo process group's worker threads alive past
    destroy_process_group, and a worker that releases a backward pass's collective (which holds a
    Python object) while the interpreter shuts down aborts the process with SIGABRT: torchrun
    would then report a finished run as failed. The run's files are written and closed by the
    time this runs; only stdout and stderr need flushing."""
    if torchrun_world() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def sum_over_processes(group: Group, *values: float | torch.Tensor) -> list[float]:
    """Each value summed over the processes (a no-op for one process)."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if group.is_distributed:
        dist.all_reduce(total)
    return total.tolist()


def weigh_by_targets(loss: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """This process's mean loss over its `count` targets, with its gradient scaled by count x world
    / (the step's targets over all processes). DistributedDataParallel averages the processes'
    gradients, which then make the gradient of the mean over every target of the step, as one
    process would take it; unscaled, a process whose chunks hold fewer targets would weigh as much
    as the others. The value stays this process's mean, for the logs. Called by every process."""
    total = torch.as_tensor(count, dtype=torch.float32, device=loss.device).clone()
    dist.all_reduce(total)
    factor = count * dist.get_world_size() / total
    return loss + (factor - 1) * (loss - loss.detach())


def gather(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's tensor (CPU), concatenated in rank order on every process."""
    if not group.is_distributed:
        return tensor.cpu()
    parts: list = [None] * group.world
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def on_main(group: Group, fn: Callable[[], T]) -> T:
    """fn() on rank 0, its result (or its exception) handed to every process, so that an error
    there stops all of them instead of leaving the others waiting."""
    if not group.is_distributed:
        return fn()
    outcome: list = [None]
    if group.is_main:
        try:
            outcome[0] = (fn(), None)
        except Exception as e:  # re-raised below, on every process
            outcome[0] = (None, e)
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result
