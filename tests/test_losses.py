"""The loss forms of training.py: chunked full softmax equals the full one; the sampled one is a
softmax over target and negatives with logQ correction."""
import pytest
import torch
import torch.nn.functional as F

from training import full_softmax_loss, sampled_softmax_loss


def problem(rows: int = 300, width: int = 16, vocab: int = 500, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64, requires_grad=True)
    return hidden, weight, torch.randint(0, vocab, (rows,), generator=g)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 299, 300, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_chunked_loss_equals_the_full_loss_in_value_and_gradients(chunk_rows, label_smoothing):
    hidden, weight, targets = problem()
    full = full_softmax_loss(hidden, weight, targets, label_smoothing)
    chunked = full_softmax_loss(hidden, weight, targets, label_smoothing, chunk_rows)
    assert torch.allclose(chunked, full, rtol=1e-12)
    grads = [torch.autograd.grad(loss, (hidden, weight)) for loss in (full, chunked)]
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads))


def test_chunked_loss_never_holds_all_logits():
    """Peak memory of the logits is one chunk's: measured through the saved tensors of autograd."""
    hidden, weight, targets = problem(rows=2000, vocab=3000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        full_softmax_loss(hidden, weight, targets, chunk_rows=100)
    assert max(saved) < 2000 * 3000 / 10  # nothing the size of the [2000 x 3000] logits is kept


def test_sampled_loss_is_a_softmax_over_target_and_negatives():
    hidden, weight, targets = problem(rows=50, vocab=40)
    negatives = torch.tensor([3, 5, 8, 13, 21])
    log_q = torch.log(torch.linspace(0.01, 1, 40, dtype=torch.float64))
    loss = sampled_softmax_loss(hidden, weight, targets, negatives, log_q)
    expected = []
    for h, t in zip(hidden, targets):
        candidates = [int(t)] + [int(n) for n in negatives if n != t]  # a negative equal to the target is left out
        logits = weight[candidates] @ h - log_q[candidates]
        expected.append(-F.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(expected).mean())


def test_sampled_loss_with_every_movie_as_negative_and_no_correction_is_the_full_loss():
    hidden, weight, targets = problem(rows=50, vocab=40)
    sampled = sampled_softmax_loss(hidden, weight, targets, torch.arange(40))
    assert torch.allclose(sampled, full_softmax_loss(hidden, weight, targets))


@pytest.mark.parametrize("loss", [["trainer_config.loss=sampled", "trainer_config.num_negatives=32"],
                                  ["trainer_config.loss=sampled", "trainer_config.negatives=in_batch"],
                                  ["trainer_config.loss_chunk_rows=100"]])
def test_each_loss_trains_a_model_that_beats_popularity(loss, ml1m_dir, tmp_path, monkeypatch):
    import model_train
    from config import DEFAULT_CONFIG, load_config
    from conftest import validation_ndcg_against_most_rated

    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT_CONFIG.parent / "configs" / "ml1m_best.yaml", [
        f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=6", "trainer_config.patience=null",
        "trainer_config.eval_every=6", "trainer_config.batch_size=32", "trainer_config.warmup_steps=5",
        "model_config.transformer_config.context_window_size=32",
        "model_config.transformer_config.embedding_dimension=32", "trainer_config.run_name=loss",
        "trainer_config.compile=false", *loss])
    ours, baseline = validation_ndcg_against_most_rated(model_train.train(config) / "last.pt")
    assert ours > 2 * baseline, (ours, baseline)


# The first two training losses of every shipped config on the data of shipped_config_losses, as
# commit 48a84d6 (before the time and feature switches) computed them: a new model option, off by
# default, must leave them as they were (the same initialisation, batches, dropout masks and
# losses). A config that turns switches on trains, with them off, as the config it adds them to.
LOSSES_BEFORE = {"training_config.yaml": [5.722581, 5.706623], "ml100k_best.yaml": [5.721671, 5.724569],
                 "ml1m_best.yaml": [5.721671, 5.724569], "ml20m.yaml": [5.735407, 5.733056],
                 "ml32m.yaml": [8.339881, 8.339576], "post.yaml": [5.728156, 5.706934],
                 "ml1m_fast.yaml": [5.720386, 5.722029]}  # a later config: as the commit that added it
ADDS_TO = {"ml100k_time.yaml": "ml100k_best.yaml", "ml1m_time.yaml": "ml1m_best.yaml",
           "ml100k_features.yaml": "ml100k_best.yaml"}
SWITCHES_OFF = ["model_config.position_bias=false", "model_config.time_bias=false", "model_config.query_time=false",
                "model_config.movie_features=[]", "model_config.user_features=[]", "model_config.rating_input=false",
                "trainer_config.rating_weights=null"]


def shipped_config_losses(path, data_dir, overrides=(), steps: int = 2) -> list[float]:
    """The first training losses of a config, eager and in float32, seeded as model_train seeds them."""
    import speed
    import training
    from build import build_model, make_datasets
    from config import load_config

    config = load_config(path, [f"trainer_config.data_dir={data_dir}", "trainer_config.cache=false", *overrides])
    tc, cpu = config.trainer_config, torch.device("cpu")
    train = make_datasets(config)["train"]
    torch.manual_seed(tc.seed)
    model = build_model(config, train.metadata)
    optimizer = training.make_optimizer(model, tc, cpu)
    step = training.make_training_step(model, training.make_loss(tc, train), optimizer,
                                       training.make_schedule(optimizer, tc, 10), tc, speed.Speed(False, False, False),
                                       cpu)
    training.seed_epoch(tc.seed, 0, 0)
    batches = train.batches(tc.batch_size, shuffle=True, generator=torch.Generator().manual_seed(tc.seed))
    return [float(step(batch)[0]) for _, batch in zip(range(steps), batches)]


def test_every_shipped_config_trains_as_before_the_time_and_feature_switches(tmp_path):
    from config import DEFAULT_CONFIG, parse_yaml
    from conftest import synthetic_ratings, write_ml1m

    folder = write_ml1m(tmp_path / "ml-1m", synthetic_ratings(80, 300, min_len=205, max_len=240), 80, 300)
    paths = [DEFAULT_CONFIG, *sorted((DEFAULT_CONFIG.parent / "configs").glob("*.yaml"))]
    configs = [path for path in paths if "model_config" in parse_yaml(path)]  # not the grids of variants
    for path in configs:  # a config without switches on is its own switched-off form
        before = LOSSES_BEFORE[ADDS_TO.get(path.name, path.name)]
        assert shipped_config_losses(path, folder, SWITCHES_OFF) == pytest.approx(before, abs=5e-5), path.name
    assert set(LOSSES_BEFORE) <= {path.name for path in configs}
