import pytest
import torch
import torch.nn.functional as F

from movielens_transformer import (MovieLensTransformer, MovieLensTransformerConfig, Transformer,
                                   TransformerConfig, dropout, explicit_attention, gelu)


def small_config(**transformer) -> MovieLensTransformerConfig:
    tc = TransformerConfig(vocab_size=50, context_window_size=5, embedding_dimension=16,
                           num_layers=2, num_heads=4, **transformer)
    return MovieLensTransformerConfig(transformer_config=tc, num_users=10,
                                      user_embedding_dimension=8, interaction_mlp_hidden_sizes=[16])


def test_output_shapes():
    model = MovieLensTransformer(small_config())
    logits = model(torch.randint(0, 50, (3, 5)), torch.tensor([0, 4, 9]))
    assert logits.shape == (3, 50)
    assert model.transformer(torch.randint(0, 50, (3, 4))).shape == (3, 4, 16)
    with pytest.raises(ValueError, match="exactly 5"):
        model(torch.randint(0, 50, (3, 4)), torch.tensor([0, 1, 2]))


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
    a, b = transformer(x), transformer(y)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_one_batch_overfits():
    torch.manual_seed(0)
    model = MovieLensTransformer(small_config(embedding_dropout=0.0, attention_dropout=0.0,
                                              residual_dropout=0.0))
    x, users, y = torch.randint(0, 50, (32, 5)), torch.randint(0, 10, (32,)), torch.randint(0, 50, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(model(x, users), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_cpu_dropout_drops_a_fraction_p_and_keeps_the_mean():
    x = torch.ones(100, 2000)
    torch.manual_seed(1)
    out = dropout(x, 0.1, True)
    dropped = (out == 0).float().mean().item()
    assert 0.097 < dropped < 0.103
    assert torch.allclose(out[out != 0], torch.tensor(65536 / (65536 - 6554)))
    assert abs(out.mean().item() - 1) < 0.005
    assert not torch.equal(out, dropout(x, 0.1, True))
    torch.manual_seed(1)
    assert torch.equal(out, dropout(x, 0.1, True))  # torch.manual_seed governs the masks
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


@pytest.mark.parametrize("compiled", [False, True])
def test_explicit_attention_equals_sdpa(compiled):
    """Eagerly the products are matmuls; compiled over a short window, broadcast sums: either way
    the values and gradients of SDPA."""
    attention = torch.compile(explicit_attention) if compiled else explicit_attention
    causal, eye = torch.ones(5, 5, dtype=torch.bool).tril(), torch.eye(5, dtype=torch.bool)
    padded = causal & torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool) | eye  # the first position is padding
    for mask in (None, padded):
        qkv = torch.randn(3, 2, 3, 5, 8, requires_grad=True)
        expected = F.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=mask is None)
        out = attention(*qkv, mask, 0.0)
        assert torch.allclose(out, expected, atol=1e-6)
        weights = torch.randn_like(out)
        grad, expected_grad = (torch.autograd.grad((y * weights).sum(), qkv)[0] for y in (out, expected))
        assert torch.allclose(grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_gelu_is_the_tanh_approximation(compiled):
    x = torch.linspace(-12, 12, 4001, requires_grad=True)
    y, expected = (torch.compile(gelu) if compiled else gelu)(x), F.gelu(x, approximate="tanh")
    assert torch.allclose(y, expected, atol=1e-6)
    grad, expected_grad = (torch.autograd.grad(z.sum(), x)[0] for z in (y, expected))
    assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_training_forward_on_a_cpu_matches_evaluation_when_nothing_is_dropped():
    """Attention dropout so small that no weight is dropped: training takes the explicit
    attention path, evaluation SDPA, and both give the same logits."""
    model = MovieLensTransformer(small_config(embedding_dropout=0.0, attention_dropout=1e-9, residual_dropout=0.0))
    x, users = torch.randint(0, 50, (4, 5)), torch.tensor([0, 1, 2, 3])
    trained = model.train()(x, users)
    assert torch.allclose(trained, model.eval()(x, users), atol=1e-5)
