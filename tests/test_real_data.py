"""A short real-data run on MovieLens-100K, when ../shared/data/ml-100k is present."""
import pytest

import releases
import model_train
from config import load_config
from conftest import SHARED_DATA, validation_ndcg_against_most_rated

ML100K = SHARED_DATA / "ml-100k"


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="no ../shared/data/ml-100k")
def test_model_beats_most_rated_on_ml100k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=[  # the post's model, 1 eager epoch (tests/test_train_step.py compiles)
        f"trainer_config.data_dir={ML100K}", "trainer_config.cache=false", "trainer_config.num_epochs=1",
        "trainer_config.batch_size=256", "trainer_config.compile=false", "trainer_config.run_name=ml100k"])
    ours, baseline = validation_ndcg_against_most_rated(model_train.train(config) / "best.pt")
    assert ours > 1.3 * baseline, (ours, baseline)


@pytest.mark.parametrize("name", list(releases.RELEASES))
def test_a_full_read_has_the_published_size(name):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"no ../shared/data/{name}")
    release_name, users, movies, ratings = releases.read_movielens(folder)
    assert (len(ratings), len(users), len(movies)) == releases.RELEASES[name].sizes
