"""The sequence training mode: causal per-position prediction over a user's history."""
import numpy as np
import torch

import data
import model_train
from config import DEFAULT_CONFIG, TrainerConfig, load_config
from conftest import chunk_batch, validation_ndcg_against_most_rated, window_batch
from movielens_transformer import MovieLensTransformer, MovieLensTransformerConfig, TransformerConfig
from training import batch_loss, make_loss


def sequence_model(context: int = 12, vocab: int = 60, users: int = 5, **kw) -> MovieLensTransformer:
    tc = TransformerConfig(vocab_size=vocab, context_window_size=context, embedding_dimension=16, num_layers=2,
                           num_heads=2, embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    return MovieLensTransformer(MovieLensTransformerConfig(tc, num_users=users, user_embedding_dimension=8,
                                                           interaction_mlp_hidden_sizes=kw.pop("hidden", []),
                                                           mode="sequence", init="normal", **kw)).eval()


def test_logits_at_t_ignore_later_inputs():
    model = sequence_model()
    x, users = torch.randint(0, 58, (3, 12)), torch.tensor([0, 2, 4])
    for t in (0, 5, 10):
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 7) % 58
        a, b = (model(chunk_batch(z, users)).view(3, 12, -1) for z in (x, y))
        assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_padding_is_invisible_to_real_positions():
    model = sequence_model()
    x, users = torch.randint(0, 58, (2, 12)), torch.tensor([1, 3])
    y = x.clone()
    y[:, :4] = (y[:, :4] + 11) % 58
    assert torch.allclose(model(window_batch(x, users, padded=4)), model(window_batch(y, users, padded=4)), atol=1e-5)
    segments = torch.zeros(2, 12, dtype=torch.long)
    segments[:, :4] = -1
    assert torch.isfinite(model(chunk_batch(x, users, segments=segments))).all()


def test_tied_output_layer_is_the_movie_embedding():
    model = sequence_model(hidden=[16], tie_output_embeddings=True)
    assert model.interaction_mlp.net[-1].weight is model.transformer.token_embedding.weight


def test_chunks_cover_each_training_target_once_and_never_held_out_items(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    chunks_source = data.HistoryChunks(movielens, context_window_size=8)
    validation = data.MovieLensSequenceDataset(movielens, "validation", 8)
    test = data.MovieLensSequenceDataset(movielens, "test", 8)
    generator = torch.Generator().manual_seed(0)
    first = chunks_source.chunks(generator)
    second = chunks_source.chunks(generator)
    assert int(first.predict.sum()) == int(second.predict.sum()) == len(chunks_source)
    assert not torch.equal(first.predict, second.predict) or len(first.predict) != len(second.predict)
    for chunk in (first, second):
        for u in range(movielens.metadata.num_users):
            rows = chunk.user_tokens[:, 0] == u
            held = {int(validation.target_tokens[u]), int(test.target_tokens[u])}
            real_inputs = chunk.movie_tokens[rows][~chunk.padding_mask[rows]]
            assert not held & set(real_inputs.tolist())
            assert not held & set(chunk.next_tokens[rows][chunk.predict[rows]].tolist())
        # every trained target sees its full history up to the context
        assert (chunk.padding_mask & chunk.predict).sum() == 0


def test_window_padding_marks_positions_before_sos(ml1m_dir):
    movielens = data.load_movielens(ml1m_dir)
    validation = data.MovieLensSequenceDataset(movielens, "validation", 50)
    batch = validation.batch(torch.arange(len(validation)))
    pad = batch.padding_mask
    sos = movielens.metadata.sos
    real = batch.movie_tokens.masked_fill(pad, -1)
    assert ((real == sos).sum(1) == 1).all()  # exactly the user's own SOS is left
    assert ((batch.movie_tokens == sos) | ~pad).all()


def test_short_sequence_run_learns(ml1m_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT_CONFIG.parent / "configs" / "ml1m_best.yaml", [
        f"trainer_config.data_dir={ml1m_dir}", "trainer_config.num_epochs=8", "trainer_config.patience=null",
        "trainer_config.eval_every=8", "trainer_config.batch_size=32", "trainer_config.warmup_steps=5",
        "model_config.transformer_config.context_window_size=32",
        "model_config.transformer_config.embedding_dimension=32", "trainer_config.run_name=seq",
        "trainer_config.compile=false"])  # the compiled packed loss: tests/test_train_step.py
    ours, baseline = validation_ndcg_against_most_rated(model_train.train(config) / "last.pt")
    assert ours > 2 * baseline, (ours, baseline)


def test_rows_are_packed_first_fit_decreasing_without_overlap():
    row, column, rows = data.pack_rows(np.array([[150, 60, 50, 40, 200], [3, 0, 0, 0, 0]]), width=200)
    assert rows.tolist() == [3, 1]
    # 200 fills a row, 150 + 50 another, 60 + 40 the third
    assert row[0].tolist() == [1, 2, 1, 2, 0] and column[0].tolist() == [0, 0, 150, 60, 0]
    lengths = np.random.default_rng(0).integers(1, 33, size=(20, 16))
    row, column, rows = data.pack_rows(lengths, width=32)
    for b in range(20):
        used = np.zeros((16, 32), dtype=int)
        for r, c, n in zip(row[b], column[b], lengths[b]):
            used[r, c:c + n] += 1
            assert c + n <= 32
        assert used.max() == 1 and rows[b] == row[b].max() + 1 < 16


def test_packed_batches_train_as_left_padded_rows(ml1m_dir):
    """The same chunks packed into fewer rows give the same loss and gradients, every target once."""
    movielens = data.load_movielens(ml1m_dir)
    padded, packed = (list(data.HistoryChunks(movielens, 24, packed=p).batches(16, generator=torch.Generator()
                                                                               .manual_seed(3))) for p in (False, True))
    assert sum(len(b.movie_tokens) for b in packed) < 0.8 * sum(len(b.movie_tokens) for b in padded)
    model = sequence_model(context=24, vocab=movielens.metadata.vocab_size, users=movielens.metadata.num_users)
    loss = make_loss(TrainerConfig(), None)
    for a, b in zip(padded, packed):
        assert int(a.predict.sum()) == int(b.predict.sum())
        assert torch.equal(a.target_tokens.sort().values, b.target_tokens.sort().values)
        gradients = []
        for batch in (a, b):
            model.zero_grad()
            value, _ = batch_loss(model, batch, loss)
            value.backward()
            gradients.append([p.grad.clone() for p in model.parameters()])
        assert torch.allclose(*(batch_loss(model, batch, loss)[0] for batch in (a, b)), atol=1e-5)
        for ga, gb in zip(*gradients):
            assert torch.allclose(ga, gb, atol=1e-6)
