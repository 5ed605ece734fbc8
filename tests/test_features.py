"""The post's next steps: movie and user features, the stars as an input, a rating-weighted loss,
and eval.py's metrics by bucket and over liked targets."""
import json

import pytest
import torch

import data
import eval as evaluation
import model_train
import synthetic
from build import build_model
from config import DEFAULT_CONFIG, load_config
from errors import ConfigError
from training import full_softmax_loss, sampled_softmax_loss, weight_by_stars

SWITCHES = {"genres": "model_config.movie_features=[genres]", "year": "model_config.movie_features=[year]",
            "age": "model_config.user_features=[age]", "sex": "model_config.user_features=[sex]",
            "occupation": "model_config.user_features=[occupation]", "stars": "model_config.rating_input=true"}


def test_users_files_give_age_groups_sex_and_occupations(tmp_path):
    for fmt in ("ml-1m", "ml-100k"):
        folder = synthetic.write_movielens(tmp_path / fmt, fmt, 30, 50, 900)
        users = data.load_movielens(folder).metadata.user_features
        expected = [synthetic.user_fields(u, fmt) for u in range(1, 31)]
        age = [int(e[0 if fmt == "ml-100k" else 1]) for e in expected]
        assert users["age"] == [sum(a >= g for g in data.AGE_GROUPS) for a in age]
        assert len(set(users["sex"])) == 2 and len(set(users["occupation"])) == len({e[2] for e in expected})
    assert data.load_movielens(synthetic.write_movielens(tmp_path / "ml-10m", "ml-10m", 30, 50, 900)
                               ).metadata.user_features == {}


def test_movie_features_come_from_the_genres_and_the_title(ml1m_dir):
    metadata = data.load_movielens(ml1m_dir).metadata
    genres, years = data.movie_feature_tensors(metadata)
    names = sorted({g for movie in metadata.genres for g in movie.split("|")})
    for token in (0, 7, 199):
        assert {names[i] for i in genres[token].nonzero().flatten().tolist()} == set(metadata.genres[token].split("|"))
        year = 1950 + token % 50  # conftest's titles: "Movie m: Café (1950 + m % 50)"
        assert years[token] == (year - data.YEAR_FIRST) // data.YEAR_STEP + 2
    assert genres[metadata.sos].sum() == 0 and years[metadata.eos] == 0
    metadata.titles[3] = "A title without a year"
    assert data.movie_feature_tensors(metadata)[1][3] == 0


@pytest.fixture(scope="module")
def varied_users(tmp_path_factory):
    """An ML-1M folder whose users differ in age, sex and occupation (synthetic.user_fields)."""
    return synthetic.write_movielens(tmp_path_factory.mktemp("data") / "ml-1m", "ml-1m", 200, 150, 8000)


def small(ml1m_dir, *overrides: str):
    return load_config(DEFAULT_CONFIG.parent / "configs" / "ml100k_best.yaml", [
        f"trainer_config.data_dir={ml1m_dir}", "model_config.transformer_config.context_window_size=16",
        "model_config.transformer_config.embedding_dimension=16", *overrides])


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_feature_switch_changes_the_models_input(varied_users, switch):
    """The model's logits move when the feature it reads moves, and only when switched on."""
    movielens = data.load_movielens(varied_users)
    batch = data.MovieLensSequenceDataset(movielens, "test", 16).batch(torch.arange(40))
    for on in (False, True):
        config = small(varied_users, *([SWITCHES[switch]] if on else []))
        torch.manual_seed(0)
        model = build_model(config, movielens.metadata).eval()
        before = model(batch)
        if switch == "stars":
            moved = batch._replace(ratings=6 - batch.ratings)
        else:
            moved = batch
            if switch in ("genres", "year") and on:
                table = model.movie_features.genres if switch == "genres" else model.movie_features.years
                table.copy_(table.roll(1, 0))
            elif on:
                tokens = getattr(model.user_features, f"{switch}_tokens")
                tokens.copy_(tokens.max() - tokens)
        after = model(moved)
        assert torch.allclose(before, after) != on, (switch, on)


def test_a_release_without_users_refuses_user_features(tmp_path):
    folder = synthetic.write_movielens(tmp_path / "ml-10m", "ml-10m", 30, 50, 900)
    config = small(folder, "model_config.user_features=[age, sex]")
    with pytest.raises(ConfigError, match=r"model_config.user_features asks for age, sex \(from --set\), which "
                                          r"ml-10m does not have"):
        build_model(config, data.load_movielens(folder).metadata)


@pytest.mark.parametrize("override, message", [
    ("model_config.movie_features=[genre]", "a list of distinct names from genres, year"),
    ("model_config.user_features=[age, age]", "a list of distinct names from age, sex, occupation"),
    ("trainer_config.rating_weights=[1, 1, 1]", "five weights for 1 to 5 stars")])
def test_bad_feature_settings_name_the_key(ml1m_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        small(ml1m_dir, override)
    with pytest.raises(ConfigError, match="user_features .* when user_embedding_dimension is 0"):
        small(ml1m_dir, "model_config.user_features=[sex]", "model_config.user_embedding_dimension=0")


def test_the_rating_weighted_loss_weighs_each_target_by_its_stars():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 30, (50,), generator=g)
    stars = torch.randint(1, 11, (50,), generator=g).double() / 2  # half stars from 0.5
    star_weights = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    weights = weight_by_stars(star_weights, stars)
    assert torch.equal(weights, star_weights[stars.ceil().long() - 1])
    each = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    expected = (each * weights).mean()
    assert torch.allclose(full_softmax_loss(hidden, weight, targets, weights=weights), expected)
    assert torch.allclose(full_softmax_loss(hidden, weight, targets, chunk_rows=7, weights=weights), expected)
    assert torch.allclose(sampled_softmax_loss(hidden, weight, targets, torch.arange(30), weights=weights), expected)
    ones = torch.ones(50, dtype=torch.float64)
    assert torch.allclose(full_softmax_loss(hidden, weight, targets, weights=ones), full_softmax_loss(hidden, weight, targets))


def test_training_with_every_feature_and_eval_by_bucket(varied_users, tmp_path, capsys):
    config = small(varied_users, "model_config.movie_features=[genres, year]",
                   "model_config.user_features=[age, sex, occupation]", "model_config.rating_input=true",
                   "trainer_config.rating_weights=[0.2, 0.4, 1, 1, 1]", "trainer_config.num_epochs=2",
                   "trainer_config.compile=false", f"trainer_config.model_dir={tmp_path / 'models'}",
                   f"trainer_config.tensorboard_dir={tmp_path / 'runs'}", "trainer_config.run_name=features")
    checkpoint = model_train.train(config) / "best.pt"
    evaluation.main(["--checkpoint", str(checkpoint), "--buckets", "--against", "most-rated", "--resamples", "20"])
    out = capsys.readouterr().out
    for group in ("targets rated 4-5 stars", "<= 20 ratings", "21-100 ratings", "target among the 10% most-rated"):
        assert f"| {group}" in out
    report = json.loads((checkpoint.parent / "eval_test_history_k10.json").read_text())
    buckets = report["buckets"]
    test = data.MovieLensSequenceDataset(data.load_movielens(varied_users), "test", 16)
    assert buckets["<= 20 ratings"]["targets"] + buckets["21-100 ratings"]["targets"] + \
        buckets["> 100 ratings"]["targets"] == len(test)
    short = (test.history_length <= 20).sum().item()
    assert buckets["<= 20 ratings"]["targets"] == short
    liked = report["liked_targets"]["targets rated 4-5 stars"]
    assert liked["targets"] == int((test.target_ratings >= 4).sum())
    assert "paired_difference" in liked and 0 <= liked["results"]["model"]["ndcg@10"] <= 1

