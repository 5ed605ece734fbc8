"""How training runs fast: decided once (speed_settings), applied once (make_training_step).

Three switches, each a trainer_config key whose null means "decide from the device":
- compile: torch.compile of the training loss (model and cross-entropy in one graph, so the
  softmax over all movies fuses with the loss) and of validation. On by default where batches
  have one fixed shape (the window mode: the sequence mode's varying number of trained
  positions ran at half the eager speed compiled) on CUDA, and on a CPU where inductor can
  build kernels (it needs a C++ compiler).
- bf16: autocast of the training loss. On by default on CUDA, and for a compiled loss on a CPU
  with bf16 arithmetic (AVX512-BF16 or AMX).
- cuda_graph: the whole step (forward, backward, Adam) captured once and replayed, one launch a
  step instead of hundreds of small kernels each waiting for Python. On by default on CUDA
  where batches have one fixed shape.
The numbers behind each default are in benchmarks/README.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from loguru import logger
from torch.nn.parallel import DistributedDataParallel

from config import TrainerConfig
from distributed import weigh_by_targets
from errors import ConfigError
from training import Loss, LossFn, ModelLoss, backward_and_update, train_step


@dataclass(frozen=True)
class Speed:
    compile: bool
    bf16: bool
    cuda_graph: bool

    def __str__(self) -> str:
        return ", ".join(f"{name} {'on' if on else 'off'}" for name, on in
                         (("compile", self.compile), ("bf16", self.bf16), ("CUDA graph", self.cuda_graph)))


def speed_settings(tc: TrainerConfig, device: torch.device, fixed_batch_shapes: bool,
                   distributed: bool = False) -> Speed:
    """The speed settings for this config, device and kind of training batches (and whether
    several processes train together: their gradients' averaging is not captured in a graph)."""
    cuda, cpu = device.type == "cuda", device.type == "cpu"
    if tc.cuda_graph and not (cuda and fixed_batch_shapes and not distributed):
        raise ConfigError("trainer_config.cuda_graph needs a CUDA device, batches of one shape "
                          "(model_config.mode: window) and one process")
    compile = fixed_batch_shapes and (cuda or cpu and can_compile_for_cpu()) if tc.compile is None else tc.compile
    bf16 = cuda or compile and cpu and has_cpu_bf16() if tc.bf16 is None else tc.bf16
    cuda_graph = cuda and fixed_batch_shapes and not distributed if tc.cuda_graph is None else tc.cuda_graph
    return Speed(compile, bf16, cuda_graph)


@functools.cache
def can_compile_for_cpu() -> bool:
    """Whether torch.compile can build CPU kernels here: it needs a C++ compiler and Python's headers."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
        return True
    except Exception as e:  # a missing compiler or header surfaces as one of several error types
        logger.warning(f"torch.compile cannot build CPU kernels here, training eagerly: {type(e).__name__}: {e}")
        return False


def has_cpu_bf16() -> bool:
    """An x86 CPU with AVX512-BF16 or AMX, as /proc/cpuinfo says (False where there is none)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def is_full(batch, tc: TrainerConfig) -> bool:
    """A batch of batch_size rows: the one shape that is compiled and captured as a CUDA graph."""
    return len(batch.user_ids) == tc.batch_size


def make_loss_fn(model: torch.nn.Module, loss: Loss, tc: TrainerConfig, speed: Speed, device: torch.device,
                 distributed: bool = False) -> LossFn:
    """batch_loss under bf16 autocast and compiled, as speed says. distributed: through
    DistributedDataParallel, which averages the gradients over the processes, each process's
    gradient weighed by its share of the step's targets."""
    model_loss = ModelLoss(model, loss)
    if distributed:
        model_loss = DistributedDataParallel(model_loss, device_ids=[device.index] if device.type == "cuda" else None)

    def loss_fn(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed.bf16, cache_enabled=False):
            return model_loss(batch)
    fn = compile_loss(loss_fn, tc, device) if speed.compile else loss_fn
    if not distributed:
        return fn

    def weighed(batch):
        loss, count = fn(batch)
        return weigh_by_targets(loss, count), count
    return weighed


def compile_loss(loss_fn: LossFn, tc: TrainerConfig, device: torch.device) -> LossFn:
    """loss_fn compiled for full batches; an epoch's last, smaller batch runs eagerly rather than
    compiling a second graph for it."""
    if device.type == "cpu":
        # inductor's CPU kernels for the embeddings' gradients add atomically unless asked not
        # to, and two runs of one seed then differed; this flag is process-wide
        torch.use_deterministic_algorithms(True, warn_only=True)
    # fallback_random: aten's random numbers, so dropout draws as it does eagerly (and faster)
    compiled = torch.compile(loss_fn, options={"fallback_random": True} if device.type == "cpu" else None)
    return lambda batch: compiled(batch) if is_full(batch, tc) else loss_fn(batch)


def capture_step(loss_fn: LossFn, optimizer: torch.optim.Optimizer, example, grad_clip: Optional[float]):
    """The forward, backward and optimizer step captured once as a CUDA graph, and a function that
    replays it on a batch of example's shape. The optimizer must be capturable and have its state."""
    static = type(example)(*(t.clone() for t in example))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up passes (no update) off the capturing stream
        for _ in range(2):
            loss_fn(static)[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, count = loss_fn(static)
        backward_and_update(loss, optimizer, grad_clip)

    def replay(batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        for buffer, tensor in zip(static, batch):
            buffer.copy_(tensor)
        graph.replay()
        return loss.detach(), count
    return replay


Step = Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]


def make_training_step(model: torch.nn.Module, loss: Loss, optimizer: torch.optim.Optimizer, schedule,
                       tc: TrainerConfig, speed: Speed, device: torch.device, distributed: bool = False) -> Step:
    """The training step for a batch, as speed says: (loss, targets) without a host sync. With a
    CUDA graph, every full batch once the optimizer has its state replays one graph captured at
    the first such batch; other batches run train_step. The optimizer must be capturable then."""
    loss_fn = make_loss_fn(model, loss, tc, speed, device, distributed)

    def eager(batch):
        return train_step(loss_fn, optimizer, batch, tc.grad_clip, schedule)
    if not speed.cuda_graph:
        return eager
    replay = None

    def step(batch):
        nonlocal replay
        if not is_full(batch, tc) or not optimizer.state:
            return eager(batch)
        replay = replay or capture_step(loss_fn, optimizer, batch, tc.grad_clip)
        out = replay(batch)
        schedule.step()
        return out
    return step
