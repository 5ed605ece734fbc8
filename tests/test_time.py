"""Time-aware attention: timestamps through the data, the relative position and time biases and
query time in the model, and eval.py and recommend.py on a model that reads time."""
import pytest
import torch

import data
import eval as evaluation
import model_train
import recommend
from config import TrainerConfig, load_config
from conftest import chunk_batch, window_batch, write_ml1m
from errors import ConfigError, UserError
from movielens_transformer import TIME_BUCKETS, time_buckets
from test_sequence import sequence_model
from training import batch_loss, make_loss

TIME = {"position_bias": True, "time_bias": True}
QUERY_TIME = {**TIME, "query_time": True}


def test_each_position_carries_its_ratings_time_and_sos_eos_their_neighbours(tmp_path):
    # user 2 rates movies 13 and 7 in the same second: the file order decides, as for the tokens
    rows = [(2, 13, 4, 50), (1, 10, 3, 20), (2, 7, 5, 50), (1, 7, 2, 10), (2, 10, 1, 40)]
    folder = write_ml1m(tmp_path / "ml-1m", rows, num_users=2, num_movies=3)
    for _ in range(2):  # built, then read back from the cache
        movielens = data.load_movielens(folder)
        assert movielens.flat_tokens.tolist() == [3, 0, 1, 4, 3, 1, 2, 0, 4]
        assert movielens.flat_times.tolist() == [10, 10, 20, 20, 40, 40, 50, 50, 50]


def test_windows_and_chunks_carry_the_times_of_their_inputs_and_targets(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    test = data.MovieLensSequenceDataset(movielens, "test", 8)
    batch = test.batch(torch.arange(len(test)))
    last = movielens.offsets + movielens.lengths
    assert torch.equal(batch.target_times, movielens.flat_times[last[batch.user_tokens]])
    assert torch.equal(batch.times[:, -1], movielens.flat_times[last[batch.user_tokens] - 1])
    for packed in (False, True):
        chunks = next(data.HistoryChunks(movielens, 24, packed).batches(16, generator=torch.Generator().manual_seed(1)))
        same_chunk = (chunks.segments[:, 1:] == chunks.segments[:, :-1]) & (chunks.segments[:, 1:] >= 0)
        assert torch.equal(chunks.query_times[:, :-1][same_chunk], chunks.times[:, 1:][same_chunk])
        assert (chunks.query_times >= chunks.times).all()


def test_time_buckets_are_logarithmic_and_bounded():
    gaps = torch.tensor([0, 1, 60, 3600, 86400, 10 ** 8])
    buckets = time_buckets(gaps)
    assert buckets[0] == 0 and (buckets.diff() > 0).all() and buckets[-1] < TIME_BUCKETS - 1
    assert torch.equal(time_buckets(-gaps), buckets) and time_buckets(torch.tensor([10 ** 12])) == TIME_BUCKETS - 1


def history(batch: int = 2, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    times = 978_300_000 + torch.cumsum(torch.randint(0, 100_000, (batch, length), generator=g), 1)
    target_times = torch.cat([times[:, 1:], times[:, -1:] + 500], 1)
    return torch.randint(0, 58, (batch, length), generator=g), times, target_times


@pytest.mark.parametrize("switches", [{"position_bias": True}, TIME, QUERY_TIME])
def test_a_prediction_reads_no_later_rating_and_only_its_own_query_time(switches):
    """A position's logits ignore every later movie and time; with query time they read the time
    of the rating they predict, and only that position's."""
    model = sequence_model(**switches)
    x, times, target_times = history()
    users = torch.tensor([1, 2])

    def logits(x, times, target_times):
        return model(chunk_batch(x, users, times, target_times)).view(2, 12, -1)
    before = logits(x, times, target_times)
    i = 5
    later_x, later_times = x.clone(), times.clone()
    later_x[:, i + 1:] = (later_x[:, i + 1:] + 7) % 58
    later_times[:, i + 1:] += 10 ** 7
    later_targets = torch.cat([later_times[:, 1:], later_times[:, -1:] + 500], 1)
    later_targets[:, i] = target_times[:, i]
    after = logits(later_x, later_times, later_targets)
    assert torch.allclose(before[:, :i + 1], after[:, :i + 1], atol=1e-5)
    asked_later = target_times.clone()
    asked_later[:, i] += 10 ** 6
    moved = logits(x, times, asked_later)
    assert torch.allclose(before[:, :i], moved[:, :i], atol=1e-5)
    assert torch.allclose(before[:, i], moved[:, i], atol=1e-5) != switches.get("query_time", False)
    if switches.get("time_bias"):
        assert not torch.allclose(before, logits(x, times + (times - times[:, :1]) * 3, target_times + 1))


@pytest.mark.parametrize("switches", [TIME, QUERY_TIME])
def test_a_time_model_scores_a_window_as_its_sequence_ends(switches):
    """Evaluation's windows (hidden) give the logits that training's positions do."""
    model = sequence_model(**switches)
    x, times, target_times = history()
    users = torch.tensor([1, 2])
    sequence = model(chunk_batch(x, users, times, target_times)).view(2, 12, -1)
    assert torch.allclose(model(window_batch(x, users, times, target_times[:, -1])), sequence[:, -1], atol=1e-5)


@pytest.mark.parametrize("switches", [TIME, QUERY_TIME])
def test_packed_time_batches_train_as_left_padded_rows(ml1m_dir, switches):
    movielens = data.load_movielens(ml1m_dir)
    padded, packed = (next(data.HistoryChunks(movielens, 24, packed=p).batches(16, generator=torch.Generator()
                                                                               .manual_seed(3))) for p in (False, True))
    model = sequence_model(context=24, vocab=movielens.metadata.vocab_size, users=movielens.metadata.num_users,
                           **switches)
    loss = make_loss(TrainerConfig(), None)
    assert torch.allclose(*(batch_loss(model, batch, loss)[0] for batch in (padded, packed)), atol=1e-5)


def test_query_time_without_the_time_bias_is_refused():
    with pytest.raises(ConfigError, match="model_config.query_time is True .* unless model_config.time_bias"):
        load_config(overrides=["model_config.query_time=true"])


@pytest.fixture(scope="module")
def time_checkpoints(ml1m_dir, tmp_path_factory):
    """A checkpoint trained with query time, and one with the time bias only: one epoch each."""
    folder = tmp_path_factory.mktemp("time")
    paths = {}
    for name, switches in (("query", QUERY_TIME), ("bias", TIME)):
        config = load_config(overrides=[
            f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=1", "trainer_config.compile=false",
            f"trainer_config.model_dir={folder / 'models'}", f"trainer_config.tensorboard_dir={folder / 'runs'}",
            f"trainer_config.run_name={name}", "model_config.mode=sequence",
            "model_config.transformer_config.context_window_size=16", "model_config.interaction_mlp_hidden_sizes=[]",
            "model_config.transformer_config.embedding_dimension=16", "model_config.transformer_config.num_layers=1",
            "trainer_config.batch_size=32", *(f"model_config.{key}=true" for key in switches)])
        paths[name] = model_train.train(config) / "best.pt"
    return paths


def test_eval_states_the_models_use_of_time(time_checkpoints, capsys):
    evaluation.main(["--checkpoint", str(time_checkpoints["query"]), "--resamples", "20"])
    assert "the model's time: query time (it reads each target's timestamp" in capsys.readouterr().out
    evaluation.main(["--checkpoint", str(time_checkpoints["bias"]), "--resamples", "20"])
    assert "the model's time: rating times\n" in capsys.readouterr().out


def test_recommend_asks_at_the_given_time_and_refuses_what_it_cannot_honour(time_checkpoints, ml1m_dir, capsys):
    query = str(time_checkpoints["query"])
    default = recommend.main(["--checkpoint", query, "--user", "5", "-k", "5"])
    assert "the user's last rating (--at sets another time)" in capsys.readouterr().out
    movielens = data.load_movielens(ml1m_dir)
    last = int(recommend.last_rating_times(movielens, torch.tensor([movielens.metadata.user_ids.index(5)]))[0])
    assert recommend.main(["--checkpoint", query, "--user", "5", "-k", "5", "--at", str(last)]) == default
    later = recommend.main(["--checkpoint", query, "--user", "5", "-k", "5", "--at", "2010-01-01"])
    assert "asked at 2010-01-01 00:00 UTC" in capsys.readouterr().out
    assert [p for *_, p in later] != [p for *_, p in default]
    with pytest.raises(UserError, match="--at 1990-01-01 is before user 5's last rating"):
        recommend.main(["--checkpoint", query, "--user", "5", "--at", "1990-01-01"])
    with pytest.raises(UserError, match="neither seconds since 1970 nor an ISO date"):
        recommend.main(["--checkpoint", query, "--user", "5", "--at", "yesterday"])
    for far in ("10000000000000", str(2**70)):  # a ValueError (year out of range) before
        with pytest.raises(UserError, match=f"--at {far} is out of range; give a moment from 1970 to the year 9999"):
            recommend.main(["--checkpoint", query, "--user", "5", "--at", far])
    with pytest.raises(UserError, match="this model does not read the time of the request"):
        recommend.main(["--checkpoint", str(time_checkpoints["bias"]), "--user", "5", "--at", "2010-01-01"])
