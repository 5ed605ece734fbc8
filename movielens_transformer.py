"""The post's model: a GPT-style causal Transformer over the movie window, a user embedding, and
an interaction MLP from [movie states || user embedding] to logits over all movies."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 3885
    context_window_size: int = 5
    embedding_dimension: int = 32
    num_layers: int = 4
    num_heads: int = 4
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    residual_dropout: float = 0.1
    mlp_ratio: int = 4


@dataclass
class MovieLensTransformerConfig:
    transformer_config: TransformerConfig = field(default_factory=TransformerConfig)
    num_users: int = 6040
    user_embedding_dimension: int = 32
    interaction_mlp_hidden_sizes: list[int] = field(default_factory=lambda: [16])


class CausalMultiHeadAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.embedding_dimension % config.num_heads:
            raise ValueError("embedding_dimension must be divisible by num_heads")
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embedding_dimension, 3 * config.embedding_dimension)
        self.out = nn.Linear(config.embedding_dimension, config.embedding_dimension)
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.residual_dropout(self.out(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.embedding_dimension
        self.fc = nn.Linear(config.embedding_dimension, hidden)
        self.proj = nn.Linear(hidden, config.embedding_dimension)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embedding_dimension)
        self.attention = CausalMultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.embedding_dimension)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Token + position embeddings, causal blocks, final LayerNorm: [B, T] -> [B, T, d]."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dimension)
        self.position_embedding = nn.Embedding(config.context_window_size, config.embedding_dimension)
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(TransformerEncoderLayer(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embedding_dimension)

    def forward(self, movie_ids: torch.Tensor) -> torch.Tensor:
        t = movie_ids.shape[1]
        if t > self.config.context_window_size:
            raise ValueError(f"input of length {t} exceeds context_window_size "
                             f"{self.config.context_window_size}")
        positions = torch.arange(t, device=movie_ids.device)
        x = self.dropout(self.token_embedding(movie_ids) + self.position_embedding(positions))
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


class InteractionMLP(nn.Module):
    """Linear+ReLU layers of the given hidden sizes, then a bias-free projection to logits."""

    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([input_size, *hidden_sizes], hidden_sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(([input_size, *hidden_sizes])[-1], output_size, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MovieLensTransformer(nn.Module):
    """The post's model: logits over all movies for the movie that follows the window."""

    def __init__(self, config: MovieLensTransformerConfig):
        super().__init__()
        self.config = config
        tc = config.transformer_config
        self.transformer = Transformer(tc)
        self.user_embedding = nn.Embedding(config.num_users, config.user_embedding_dimension)
        width = tc.context_window_size * (tc.embedding_dimension + config.user_embedding_dimension)
        self.interaction_mlp = InteractionMLP(width, config.interaction_mlp_hidden_sizes, tc.vocab_size)
        self.apply(init_weights)

    def forward(self, movie_ids: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
        b, t = movie_ids.shape
        if t != self.config.transformer_config.context_window_size:
            raise ValueError(f"window of length {t}; the model takes exactly "
                             f"{self.config.transformer_config.context_window_size}")
        states = self.transformer(movie_ids)
        users = self.user_embedding(user_ids)[:, None, :].expand(b, t, -1)
        return self.interaction_mlp(torch.cat([states, users], dim=-1).reshape(b, -1))


def init_weights(module: nn.Module) -> None:
    """The post's initialisation: weights uniform in [-0.1, 0.1], biases zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.uniform_(module.weight, -0.1, 0.1)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
