import pytest
import torch
import torch.nn.functional as F

from conftest import window_batch
from movielens_transformer import MovieLensTransformer, MovieLensTransformerConfig, Transformer, TransformerConfig


def small_config(**transformer) -> MovieLensTransformerConfig:
    tc = TransformerConfig(vocab_size=50, context_window_size=5, embedding_dimension=16,
                           num_layers=2, num_heads=4, **transformer)
    return MovieLensTransformerConfig(transformer_config=tc, num_users=10,
                                      user_embedding_dimension=8, interaction_mlp_hidden_sizes=[16])


def test_output_shapes():
    model = MovieLensTransformer(small_config())
    logits = model(window_batch(torch.randint(0, 50, (3, 5)), torch.tensor([0, 4, 9])))
    assert logits.shape == (3, 50)
    assert model.transformer(window_batch(torch.randint(0, 50, (3, 4)), None), masked=False).shape == (3, 4, 16)
    with pytest.raises(ValueError, match="exactly 5"):
        model(window_batch(torch.randint(0, 50, (3, 4)), torch.tensor([0, 1, 2])))


def test_post_initialisation_is_uniform_in_a_tenth():
    model = MovieLensTransformer(small_config())
    w = model.transformer.token_embedding.weight
    assert w.abs().max() <= 0.1 and w.std() > 0.05
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_attention_is_causal():
    transformer = Transformer(small_config().transformer_config).eval()
    x = torch.randint(0, 50, (2, 5))
    y = x.clone()
    y[:, 3:] = (y[:, 3:] + 1) % 50
    a, b = (transformer(window_batch(z, None), masked=False) for z in (x, y))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_one_batch_overfits():
    torch.manual_seed(0)
    model = MovieLensTransformer(small_config(embedding_dropout=0.0, attention_dropout=0.0,
                                              residual_dropout=0.0))
    x, users, y = torch.randint(0, 50, (32, 5)), torch.randint(0, 10, (32,)), torch.randint(0, 50, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(model(window_batch(x, users)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_training_forward_on_a_cpu_matches_evaluation_when_nothing_is_dropped():
    """Attention dropout so small that no weight is dropped: training takes the written-out
    attention path, evaluation SDPA, and both give the same logits."""
    model = MovieLensTransformer(small_config(embedding_dropout=0.0, attention_dropout=1e-9, residual_dropout=0.0))
    batch = window_batch(torch.randint(0, 50, (4, 5)), torch.tensor([0, 1, 2, 3]))
    trained = model.train()(batch)
    assert torch.allclose(trained, model.eval()(batch), atol=1e-5)
