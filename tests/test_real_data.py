"""A short real-data run on MovieLens-100K, when ../shared/data/ml-100k is present."""
import pytest

import data
import eval as evaluation
import model_train
from conftest import SHARED_DATA

ML100K = SHARED_DATA / "ml-100k"


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="no ../shared/data/ml-100k")
def test_model_beats_most_rated_on_ml100k(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = model_train.load_config(overrides=[f"trainer_config.data_dir={ML100K}",
                                                "trainer_config.cache=false",
                                                "trainer_config.num_epochs=3",
                                                "trainer_config.run_name=ml100k"])
    run = model_train.train(config)
    model, config, _ = model_train.model_from_checkpoint(model_train.load_checkpoint(run / "best.pt"))
    datasets = model_train.make_datasets(config)
    validation = datasets["validation"]
    model_ndcg = evaluation.evaluate(evaluation.model_scorer(model), validation, ks=(10,))["ndcg@10"]
    most_rated = evaluation.popularity_baselines(validation)["most-rated"]
    baseline_ndcg = evaluation.evaluate(evaluation.constant_scorer(most_rated), validation, ks=(10,))["ndcg@10"]
    assert model_ndcg > 1.3 * baseline_ndcg, (model_ndcg, baseline_ndcg)
