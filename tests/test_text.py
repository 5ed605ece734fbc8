"""The text feature: each movie's title and genres through a sentence-transformers model, offline.

The model is a tiny random BERT that the fixture saves in the sentence-transformers layout, so no
test reaches the network (HF_HUB_OFFLINE is set besides). Everything runs in this process:
importing sentence-transformers costs about 10 s, paid once.
"""
import json
import shutil

import pytest
import torch

import eval as evaluation
import model_train
import recommend
import text
from build import build_model
from config import load_config
from data import load_movielens
from errors import ConfigError, run_script
from conftest import SMALL_MODEL, chunk_batch

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A sentence-transformers folder: a one-layer BERT of width 16 with random weights, a
    word-piece vocabulary of single characters, mean pooling, unit-length output."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("text-model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *(f"##{c}" for c in LETTERS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(folder)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (folder / "modules.json").write_text(json.dumps([{"idx": i, "name": str(i), "path": path,
                                                      "type": f"sentence_transformers.models.{kind}"}
                                                     for i, (path, kind) in enumerate(modules)]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    for path in ("1_Pooling", "2_Normalize"):
        (folder / path).mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                                  "pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def data_copy(ml1m_dir, tmp_path):
    """The synthetic ML-1M folder, copied: the text cache is written beside it."""
    return shutil.copytree(ml1m_dir, tmp_path / "ml-1m")


def test_text_vectors_are_computed_once_and_kept_beside_the_data(text_model, data_copy, offline, monkeypatch):
    metadata = load_movielens(data_copy, cache=False).metadata
    vectors = text.text_embeddings(metadata, str(text_model), data_copy)
    assert vectors.shape == (metadata.vocab_size, 16) and vectors.dtype == torch.float32
    movies = metadata.num_movies
    assert (vectors[[metadata.sos, metadata.eos]] == 0).all()  # SOS and EOS have no text
    assert torch.allclose(vectors[:movies].norm(dim=1), torch.ones(movies), atol=1e-5)
    assert text.movie_texts(metadata)[1] == f"{metadata.titles[1]}. {metadata.genres[1].replace('|', ', ')}"

    kept = list(data_copy.glob(".movielens_text_*.pt"))
    assert len(kept) == 1
    monkeypatch.setattr(text, "embed", lambda *args: pytest.fail("computed again"))
    assert torch.equal(text.text_embeddings(metadata, str(text_model), data_copy), vectors)
    other = text.cache_path(data_copy, "another/model", text.movie_texts(metadata))
    assert other != kept[0]  # another model is another file, never these vectors
    (text_model / "config.json").touch()  # new files in the same folder: computed anew
    assert text.cache_path(data_copy, str(text_model), text.movie_texts(metadata)) != kept[0]


def test_text_is_read_by_the_model(text_model, ml1m_dir, offline):
    """The projected text is part of each history movie's input: other text, other states."""
    config = load_config(overrides=[f"trainer_config.data_dir={ml1m_dir}", "trainer_config.cache=false",
                                    "model_config.mode=sequence", "model_config.movie_features=[text]",
                                    f"model_config.text_model={text_model}", *SMALL_MODEL])
    metadata = load_movielens(ml1m_dir, cache=False).metadata
    model = build_model(config, metadata).eval()
    assert model.movie_features.text_projection.weight.shape == (16, 16)
    batch = chunk_batch(torch.tensor([[1, 5, 9, 4]]), torch.tensor([3]))
    before = model.hidden(batch)  # [positions, d]
    model.movie_features.text[9] = -model.movie_features.text[9]
    after = model.hidden(batch)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2:], after[2:])  # causal


@pytest.mark.parametrize("how", ["init", "add"])
def test_text_at_the_output(how, text_model, ml1m_dir, offline):
    """init: movies of the same text start with the same output embedding, at the init's scale;
    add: a movie's text reaches its own score, learned through a projection of its own."""
    metadata = load_movielens(ml1m_dir, cache=False).metadata
    metadata.titles[2], metadata.genres[2] = metadata.titles[1], metadata.genres[1]  # two movies, one text
    config = load_config(overrides=[f"trainer_config.data_dir={ml1m_dir}", "model_config.mode=sequence",
                                    "model_config.movie_features=[text]", f"model_config.text_model={text_model}",
                                    f"model_config.text_output={how}", "model_config.init=normal", *SMALL_MODEL])
    torch.manual_seed(0)
    model = build_model(config, metadata).eval()
    weight = model.output_weight
    movies = weight[:metadata.num_movies]
    if how == "init":
        assert torch.equal(weight[1], weight[2]) and not torch.allclose(weight[1], weight[3])
        assert movies.std().item() == pytest.approx(0.02, rel=0.1)
        return
    assert not torch.allclose(weight[1], weight[2])  # the text part is shared, the id's own is not
    assert torch.allclose(weight[1] - weight[2], model.interaction_mlp.net[-1].weight[1] -
                          model.interaction_mlp.net[-1].weight[2])
    batch = chunk_batch(torch.tensor([[1, 5, 9, 4]]), torch.tensor([3]))
    before = model(batch)
    model.movie_features.text[7] = -model.movie_features.text[7]  # a movie outside the history
    changed = (model(batch) != before).any(0)
    assert changed.nonzero().flatten().tolist() == [7]
    model(batch).sum().backward()
    assert model.text_output.weight.grad.abs().sum() > 0


def test_text_output_needs_the_text_feature():
    with pytest.raises(ConfigError, match="model_config.text_output is 'add' .*; it must be none unless "
                                          "model_config.movie_features has text"):
        load_config(overrides=["model_config.text_output=add", "model_config.movie_features=[genres]"])


def test_a_model_with_text_trains_evaluates_and_recommends(text_model, data_copy, tmp_path, capsys, offline):
    config = load_config(overrides=[
        f"trainer_config.data_dir={data_copy}", "model_config.movie_features=[genres, text]",
        f"model_config.text_model={text_model}", "trainer_config.num_epochs=1", "trainer_config.compile=false",
        f"trainer_config.model_dir={tmp_path / 'models'}", f"trainer_config.tensorboard_dir={tmp_path / 'runs'}",
        "trainer_config.run_name=text", *SMALL_MODEL])
    run = model_train.train(config)
    first = evaluation.main(["--checkpoint", str(run), "--resamples", "20"])["model"]
    assert first["ndcg@10"] > 0
    for cache in data_copy.glob(".movielens_text_*.pt"):
        cache.unlink()  # evaluated elsewhere: the vectors are computed anew from the checkpoint's titles
    assert evaluation.main(["--checkpoint", str(run), "--resamples", "20"])["model"] == first
    top = recommend.main(["--checkpoint", str(run), "--user", "1", "-k", "3"])
    assert len(top) == 3 and "top 3 next movies" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["missing folder", "no sentence-transformers"])
def test_a_text_model_that_cannot_be_loaded_is_one_line(model, ml1m_dir, tmp_path, capsys, offline, monkeypatch):
    if model == "no sentence-transformers":
        monkeypatch.setitem(__import__("sys").modules, "sentence_transformers", None)  # import fails
    monkeypatch.chdir(tmp_path)
    code = run_script(model_train.main, ["--set", f"trainer_config.data_dir={ml1m_dir}", "--set",
                                         "model_config.movie_features=[text]", "--set",
                                         f"model_config.text_model={tmp_path / 'nowhere'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    expected = ("error: model_config.text_model" if model == "missing folder"
                else "error: model_config.movie_features asks for text, which needs sentence-transformers")
    assert lines[0].startswith(expected), lines
    assert not list(tmp_path.glob("models/*"))  # no run folder left behind
