"""How training runs fast: three switches decided once (speed_settings) and the wrappers that
apply them, each a function of a step or loss (training.make_training_step applies them).

Each switch is a trainer_config key whose null means "decide from the device":
- compile: torch.compile of the training loss (model and cross-entropy in one graph, so the
  softmax over all movies fuses with the loss) and of validation. On by default where batches
  have one fixed shape (the window mode) on CUDA, and on a CPU where inductor can build kernels
  (it needs a C++ compiler) for those and for packed chunks (the sequence mode), whose varying
  rows it compiles once with dynamic shapes.
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
from typing import Any, Callable

import torch
from loguru import logger

from config import TrainerConfig
from errors import ConfigError

Step = Callable[[Any], tuple[torch.Tensor, torch.Tensor | int]]  # a batch -> (mean loss, its targets)


@dataclass(frozen=True)
class Speed:
    compile: bool
    bf16: bool
    cuda_graph: bool

    def __str__(self) -> str:
        return ", ".join(f"{name} {'on' if on else 'off'}" for name, on in
                         (("compile", self.compile), ("bf16", self.bf16), ("CUDA graph", self.cuda_graph)))


def speed_settings(tc: TrainerConfig, device: torch.device, batch_shapes: str, distributed: bool = False) -> Speed:
    """The speed settings for this config, device and kind of training batches (the data set's
    batch_shapes: "fixed", "packed" or "varying"), and whether several processes train together
    (their gradients' averaging is not captured in a graph)."""
    cuda, cpu = device.type == "cuda", device.type == "cpu"
    fixed = batch_shapes == "fixed"
    if tc.cuda_graph and not (cuda and fixed and not distributed):
        raise ConfigError("trainer_config.cuda_graph needs a CUDA device, batches of one shape "
                          "(model_config.mode: window) and one process")
    # the condition is evaluated first: a compile setting given never probes the compiler (seconds)
    compile = (fixed and cuda or (fixed or batch_shapes == "packed") and cpu and can_compile_for_cpu()
               if tc.compile is None else tc.compile)
    bf16 = cuda or compile and cpu and has_cpu_bf16() if tc.bf16 is None else tc.bf16
    cuda_graph = cuda and fixed and not distributed if tc.cuda_graph is None else tc.cuda_graph
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


def in_bf16(fn: Step, device: torch.device, enabled: bool) -> Step:
    """fn under bf16 autocast where enabled."""
    def autocast(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False):
            return fn(batch)
    return autocast


def compiled_for_full_batches(fn: Step, batch_size: int, device: torch.device) -> Step:
    """fn compiled for full batches; an epoch's last, smaller batch runs eagerly rather than
    compiling a second graph for it."""
    if device.type == "cpu":
        # inductor's CPU kernels for the embeddings' gradients add atomically unless asked not
        # to, and two runs of one seed then differed; this flag is process-wide
        torch.use_deterministic_algorithms(True, warn_only=True)
    # fallback_random: aten's random numbers, so dropout draws as it does eagerly (and faster)
    compiled = torch.compile(fn, options={"fallback_random": True} if device.type == "cpu" else None)
    return lambda batch: compiled(batch) if batch.fills(batch_size) else fn(batch)


def replayed_as_cuda_graph(step: Step, loss_fn: Step, optimizer: torch.optim.Optimizer, batch_size: int) -> Step:
    """step (forward, backward, optimizer update) captured as a CUDA graph at the first full batch
    once the optimizer has its state, and replayed for every later full batch; other batches run
    step itself. loss_fn (step's forward) warms up the capture; the optimizer must be capturable."""
    replay = None

    def graphed(batch):
        nonlocal replay
        if not batch.fills(batch_size) or not optimizer.state:
            return step(batch)
        replay = replay or capture(step, loss_fn, optimizer, batch)
        return replay(batch)
    return graphed


def capture(step: Step, loss_fn: Step, optimizer: torch.optim.Optimizer, example) -> Step:
    """step captured once as a CUDA graph on a copy of example, and a function that replays it on
    a batch of example's shape."""
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
        loss, count = step(static)

    def replay(batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        for buffer, tensor in zip(static, batch):
            buffer.copy_(tensor)
        graph.replay()
        return loss, count
    return replay
