"""The training step's parts that run without a GPU: compiled loss, optimizer, schedule, graph switch."""
import pytest
import torch

import model_train
from data import load_movielens, MovieLensSequenceDataset


def small_config(*overrides: str) -> model_train.Config:
    """A one-layer model without dropout, so that two ways of computing its loss agree."""
    return model_train.load_config(overrides=[
        "model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
        *(f"model_config.transformer_config.{k}=0.0" for k in ("embedding_dropout", "attention_dropout",
                                                               "residual_dropout")), *overrides])


def test_compiled_loss_equals_eager_loss(ml1m_dir):
    data = load_movielens(ml1m_dir, cache=False)
    batch = next(MovieLensSequenceDataset(data, "train").batches(64))
    config = small_config("trainer_config.batch_size=64", "trainer_config.bf16=false")
    model = model_train.build_model(config, data.metadata)
    cpu = torch.device("cpu")
    config.trainer_config.compile = False
    eager = model_train.make_loss_fn(model, config.trainer_config, cpu)
    config.trainer_config.compile = True
    compiled = model_train.make_loss_fn(model, config.trainer_config, cpu)
    (a, n), (b, m) = eager(batch), compiled(batch)
    assert n == m == 64
    assert torch.allclose(a, b, atol=1e-5)
    b.backward()
    assert model.transformer.token_embedding.weight.grad.abs().sum() > 0


def test_capturable_learning_rate_is_one_tensor_the_schedule_fills():
    tc = model_train.TrainerConfig(learning_rate=1e-3, warmup_steps=4)
    model = torch.nn.Linear(3, 2)
    optimizer = model_train.make_optimizer(model, tc, torch.device("cpu"), capturable=True)
    lr = optimizer.param_groups[0]["lr"]
    schedule = model_train.make_schedule(optimizer, tc, steps_per_epoch=10)
    assert float(lr) == pytest.approx(0.25e-3)
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr  # a CUDA graph keeps reading this tensor
    assert float(lr) == pytest.approx(0.75e-3)
    saved = optimizer.state_dict()
    resumed = model_train.make_optimizer(model, tc, torch.device("cpu"), capturable=True)
    lr = resumed.param_groups[0]["lr"]
    model_train.load_optimizer_state(resumed, saved)
    assert resumed.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.75e-3)


def test_cuda_graph_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not model_train.uses_cuda_graph(small_config(), cpu)
    assert model_train.uses_cuda_graph(small_config(), cuda)
    assert not model_train.uses_cuda_graph(small_config("model_config.mode=sequence"), cuda)
    assert not model_train.uses_cuda_graph(small_config("trainer_config.compile_mode=reduce-overhead"), cuda)
    with pytest.raises(ValueError, match="trainer_config.cuda_graph"):
        model_train.uses_cuda_graph(small_config("trainer_config.cuda_graph=true"), cpu)


def test_gradients_are_clipped_before_the_step():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = (model(torch.full((4, 3), 100.0)) ** 2).sum()
    model_train.backward_and_update(loss, optimizer, grad_clip=0.5)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(0.5)


def test_without_a_working_compiler_the_cpu_trains_eagerly(monkeypatch, ml1m_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    model_train.inductor_builds.cache_clear()
    monkeypatch.setattr(torch, "compile", broken)
    try:
        config = small_config()
        data = load_movielens(ml1m_dir, cache=False)
        model = model_train.build_model(config, data.metadata)
        assert not model_train.compiles_by_default(model, torch.device("cpu"))
        loss, n = model_train.make_loss_fn(model, config.trainer_config, torch.device("cpu"))(
            next(MovieLensSequenceDataset(data, "train").batches(8)))
        assert n == 8 and loss > 0
    finally:
        model_train.inductor_builds.cache_clear()


def test_keep_freed_memory_sets_glibc_thresholds_and_is_a_no_op_elsewhere(monkeypatch):
    calls = []

    class Glibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1
    monkeypatch.setattr(model_train.ctypes, "CDLL", lambda name: Glibc())
    model_train.keep_freed_memory()
    assert sorted(calls) == [(-3, 1 << 30), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(model_train.ctypes, "CDLL", no_glibc)
    model_train.keep_freed_memory()  # nothing to set, no error
