"""Each fast form in ops.py against its reference: SDPA, F.dropout, F.gelu (tanh)."""
import pytest
import torch
import torch.nn.functional as F

from ops import attention, dropout, gelu, small_table_lookup, written_out_attention


def padded_causal_mask() -> torch.Tensor:
    """Causal over 5 positions, the first one padding: it attends to itself only."""
    causal, eye = torch.ones(5, 5, dtype=torch.bool).tril(), torch.eye(5, dtype=torch.bool)
    return causal & torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool) | eye


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_has_f_dropouts_statistics(p):
    x = torch.ones(200, 2000)
    torch.manual_seed(1)
    ours, reference = dropout(x, p, True), F.dropout(x, p, True)
    for out in (ours, reference):
        assert abs((out == 0).float().mean().item() - p) < 0.003  # the fraction dropped
        assert abs(out.mean().item() - 1) < 0.006                 # the mean kept
    assert not torch.equal(ours, dropout(x, p, True))
    torch.manual_seed(1)
    assert torch.equal(ours, dropout(x, p, True))  # torch.manual_seed governs the masks


def test_dropout_outside_training_or_at_the_ends_is_f_dropout():
    x = torch.randn(10, 10)
    assert torch.equal(dropout(x, 0.1, False), x) and torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), F.dropout(x, 1.0, True))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("fn", [attention, written_out_attention])
def test_attention_equals_sdpa(fn, compiled):
    """Eager, the written-out products are matmuls; compiled for a CPU over a short window,
    broadcast sums: either way the values and gradients of SDPA, with a relative bias too (an
    additive mask in SDPA)."""
    cases = [(None, None), (padded_causal_mask(), None), (None, torch.randn(2, 3, 5, 5)),
             (padded_causal_mask(), torch.randn(2, 3, 5, 5))]
    if compiled:  # each case is a graph to compile: the two ends cover the branches between them
        fn, cases = torch.compile(fn), cases[::3]
    for mask, bias in cases:
        qkv = torch.randn(3, 2, 3, 5, 8, requires_grad=True)
        allowed = torch.ones(5, 5, dtype=torch.bool).tril() if mask is None else mask
        additive = None if bias is None else bias.masked_fill(~allowed, float("-inf"))
        expected = F.scaled_dot_product_attention(*qkv, attn_mask=mask if bias is None else additive,
                                                  is_causal=mask is None and bias is None)
        out = fn(*qkv, mask, 0.0, bias)
        assert torch.allclose(out, expected, atol=1e-6)
        weights = torch.randn_like(out)
        grad, expected_grad = (torch.autograd.grad((y * weights).sum(), qkv)[0] for y in (out, expected))
        assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_attention_dropout_is_unbiased():
    """Dropped attention weights are rescaled: averaged over many draws, the output is SDPA's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 8).expand(20000, 1, 5, 8) for _ in range(3))
    mean = attention(q, k, v, padded_causal_mask(), 0.2).mean(0)
    expected = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=padded_causal_mask())[0]
    assert torch.allclose(mean, expected, atol=0.03)


@pytest.mark.parametrize("compiled", [False, True])
def test_gelu_is_the_tanh_approximation(compiled):
    x = torch.linspace(-12, 12, 4001, requires_grad=True)
    y, expected = (torch.compile(gelu) if compiled else gelu)(x), F.gelu(x, approximate="tanh")
    assert torch.allclose(y, expected, atol=1e-6)
    grad, expected_grad = (torch.autograd.grad(z.sum(), x)[0] for z in (y, expected))
    assert torch.allclose(grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_small_table_lookup_is_f_embedding(compiled):
    """The relative biases' lookup: F.embedding's values and table gradient, summed another way."""
    fn = torch.compile(small_table_lookup) if compiled else small_table_lookup
    table = torch.randn(64, 2, requires_grad=True)
    index = torch.randint(0, 64, (3, 20, 20))
    out, expected = fn(table, index), F.embedding(index, table)
    assert torch.equal(out, expected)
    weights = torch.randn_like(out)
    grad, expected_grad = (torch.autograd.grad((y * weights).sum(), table)[0] for y in (out, expected))
    assert torch.allclose(grad, expected_grad, atol=1e-5)
