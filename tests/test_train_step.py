"""The training step: the loss compiled or not, the optimizer and its schedule, the speed settings."""
import copy

import pytest
import torch

import speed
from build import build_model
from config import TrainerConfig, load_config
from data import MovieLensSequenceDataset, HistoryChunks, load_movielens
from ops import dropout
from training import (ModelLoss, full_softmax_loss, load_optimizer_state, make_optimizer, make_schedule,
                      make_training_step, seed_epoch, train_step)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def small_config(*overrides: str):
    """A one-layer model without dropout, so that two ways of computing its loss agree."""
    return load_config(overrides=[
        "model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
        *(f"model_config.transformer_config.{k}=0.0" for k in ("embedding_dropout", "attention_dropout",
                                                               "residual_dropout")), *overrides])


def test_compiled_loss_equals_eager_loss(ml1m_dir):
    data = load_movielens(ml1m_dir, cache=False)
    batch = next(MovieLensSequenceDataset(data, "train").batches(64))
    config = small_config("trainer_config.batch_size=64")
    model = build_model(config, data.metadata)
    eager = ModelLoss(model, full_softmax_loss)
    compiled = speed.compiled_for_full_batches(eager, 64, CPU)
    (a, n), (b, m) = eager(batch), compiled(batch)
    assert n == m == 64
    assert torch.allclose(a, b, atol=1e-5)


def test_compiled_packed_loss_and_gradients_equal_eager_ones(ml1m_dir):
    """The sequence mode's default on a CPU, every shipped config's: packed chunks through the
    compiled loss, and its compiled backward."""
    data = load_movielens(ml1m_dir, cache=False)
    batch = next(HistoryChunks(data, 16).batches(32, generator=torch.Generator().manual_seed(0)))
    assert (batch.segments.max(1).values > 0).any()  # some row holds several chunks
    config = small_config("model_config.mode=sequence", "model_config.transformer_config.context_window_size=16",
                          "model_config.interaction_mlp_hidden_sizes=[]")
    model = build_model(config, data.metadata)
    eager = ModelLoss(model, full_softmax_loss)
    compiled = speed.compiled_for_full_batches(eager, 32, CPU)
    gradients = []
    for loss in (eager, compiled):
        model.zero_grad()
        value, n = loss(batch)
        value.backward()
        gradients.append((value.detach(), n, {name: p.grad.clone() for name, p in model.named_parameters()
                                              if p.grad is not None}))
    (a, n, eager_grads), (b, m, compiled_grads) = gradients
    assert n == m and torch.allclose(a, b, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and "transformer.token_embedding.weight" in eager_grads
    assert all(torch.allclose(eager_grads[name], compiled_grads[name], atol=1e-6) for name in eager_grads)


def steps(model, optimizer, schedule, n: int) -> None:
    for i in range(n):
        train_step(lambda x: ((model(x) ** 2).mean(), 1), optimizer, torch.full((2, 3), float(i + 1)))
        schedule.step()


def test_capturable_optimizer_follows_the_schedule_and_resumes():
    """The optimizer a CUDA graph needs (its learning rate a tensor) trains as the plain one does,
    warm-up included, and continues from its saved state as if never stopped."""
    tc = TrainerConfig(learning_rate=1e-2, warmup_steps=4, lr_schedule="cosine", num_epochs=1)
    torch.manual_seed(0)
    plain_model = torch.nn.Linear(3, 2)
    capturable_model = copy.deepcopy(plain_model)
    runs = []
    for model, capturable in ((plain_model, False), (capturable_model, True)):
        optimizer = make_optimizer(model, tc, CPU, capturable=capturable)
        schedule = make_schedule(optimizer, tc, steps_per_epoch=10)
        steps(model, optimizer, schedule, 3)
        runs.append((model, optimizer, schedule))
    assert all(torch.allclose(a, b) for a, b in zip(plain_model.parameters(), capturable_model.parameters()))

    resumed_model = copy.deepcopy(capturable_model)
    resumed = make_optimizer(resumed_model, tc, CPU, capturable=True)
    resumed_schedule = make_schedule(resumed, tc, steps_per_epoch=10)  # the trainer's order
    load_optimizer_state(resumed, copy.deepcopy(runs[1][1].state_dict()))  # as saved and read back
    resumed_schedule.load_state_dict(runs[1][2].state_dict())
    steps(capturable_model, *runs[1][1:], 4)
    steps(resumed_model, resumed, resumed_schedule, 4)
    assert float(resumed.param_groups[0]["lr"]) == pytest.approx(float(runs[1][1].param_groups[0]["lr"]))
    assert all(torch.allclose(a, b) for a, b in zip(capturable_model.parameters(), resumed_model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_the_eager_step(ml1m_dir):
    """Replayed as one CUDA graph, the steps of a warm-up schedule give the eager step's losses.

    Losses, not weights: CUDA's attention backward adds in no fixed order, and Adam turns gradients
    that differ in their last bits into weights that differ by up to the learning rate (on the
    CPU, gradient noise of 1e-7 relative moved this model's weights by 1e-5 in 8 steps and its
    losses by under 1e-7). A graph that kept a stale learning rate, Adam step count, gradient or
    batch moved these losses by 2.5e-4 or more within 16 steps."""
    data = load_movielens(ml1m_dir, cache=False)
    train = MovieLensSequenceDataset(data, "train").to(CUDA)
    config = small_config("trainer_config.batch_size=64", "trainer_config.warmup_steps=5",
                          "trainer_config.bf16=false", "trainer_config.compile=false")
    tc = config.trainer_config
    torch.manual_seed(0)
    models = [build_model(config, data.metadata).to(CUDA)]
    models.append(copy.deepcopy(models[0]))
    losses = []
    for model, graphed in zip(models, (False, True)):
        settings = speed.Speed(compile=False, bf16=False, cuda_graph=graphed)
        optimizer = make_optimizer(model, tc, CUDA, capturable=graphed)
        schedule = make_schedule(optimizer, tc, steps_per_epoch=10)
        step = make_training_step(model, full_softmax_loss, optimizer, schedule, tc, settings, CUDA)
        losses.append(torch.tensor([float(step(batch)[0]) for batch in list(train.batches(64))[:16]]))
    differences = ((losses[1] - losses[0]).abs() / losses[0]).tolist()
    assert max(differences) <= 5e-5, f"the replayed steps' losses differ from the eager steps' by {differences}"


def test_speed_settings():
    fixed, packed, varying = "fixed", "packed", "varying"
    with_compiler = speed.can_compile_for_cpu()
    assert speed.speed_settings(TrainerConfig(), CPU, fixed).compile == with_compiler
    assert speed.speed_settings(TrainerConfig(), CPU, packed).compile == with_compiler
    assert speed.speed_settings(TrainerConfig(), CPU, varying) == speed.Speed(False, False, False)
    assert speed.speed_settings(TrainerConfig(), CUDA, packed) == speed.Speed(False, True, False)
    assert speed.speed_settings(TrainerConfig(), CUDA, fixed) == speed.Speed(True, True, True)
    assert speed.speed_settings(TrainerConfig(), CUDA, varying) == speed.Speed(False, True, False)
    assert speed.speed_settings(TrainerConfig(compile=False), CPU, fixed).bf16 is False
    with pytest.raises(ValueError, match="trainer_config.cuda_graph"):
        speed.speed_settings(TrainerConfig(cuda_graph=True), CPU, fixed)


def test_a_compile_setting_given_is_taken_without_probing_the_compiler(monkeypatch):
    monkeypatch.setattr(speed, "can_compile_for_cpu", lambda: pytest.fail("probed the compiler"))
    assert speed.speed_settings(TrainerConfig(compile=False), CPU, "fixed") == speed.Speed(False, False, False)
    assert speed.speed_settings(TrainerConfig(compile=True), CPU, "packed").compile


def test_gradients_are_clipped_before_the_step():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(lambda x: ((model(x) ** 2).sum(), 4), optimizer, torch.full((4, 3), 100.0), grad_clip=0.5)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(0.5)


def test_without_a_working_compiler_the_cpu_trains_eagerly(monkeypatch, ml1m_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    speed.can_compile_for_cpu.cache_clear()
    monkeypatch.setattr(torch, "compile", broken)
    try:
        config = small_config()
        settings = speed.speed_settings(config.trainer_config, CPU, "fixed")
        assert not settings.compile
        data = load_movielens(ml1m_dir, cache=False)
        model = build_model(config, data.metadata)
        optimizer = make_optimizer(model, config.trainer_config, CPU)
        step = make_training_step(model, full_softmax_loss, optimizer, make_schedule(optimizer, config.trainer_config, 1),
                                  config.trainer_config, settings, CPU)
        loss, n = step(next(MovieLensSequenceDataset(data, "train").batches(8)))
        assert n == 8 and loss > 0
    finally:
        speed.can_compile_for_cpu.cache_clear()


def test_each_process_draws_its_own_dropout_masks_and_a_resumed_epoch_the_same():
    def mask(epoch: int, rank: int) -> torch.Tensor:
        seed_epoch(seed=1, epoch=epoch, rank=rank)
        torch.rand(3)  # whatever the epoch drew before
        return dropout(torch.ones(4096), 0.5, training=True) > 0

    assert torch.equal(mask(epoch=3, rank=0), mask(epoch=3, rank=0))  # resumed at epoch 3
    assert not torch.equal(mask(epoch=3, rank=0), mask(epoch=3, rank=1))
    assert not torch.equal(mask(epoch=3, rank=0), mask(epoch=4, rank=0))
