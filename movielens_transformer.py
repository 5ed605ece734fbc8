"""The post's model: a GPT-style causal Transformer over the movie window, a user embedding, and
an interaction MLP from [movie states || user embedding] to logits over all movies.

Two modes share these parts. `window` (the post's): the states of the whole window, each beside
the user embedding, are flattened into one MLP input that predicts the next movie. `sequence`:
the Transformer reads a user's history up to `context_window_size` (left-padded, with a padding
mask; in training several short histories may share a row, each attending only to itself), and
[state || user embedding] at every position goes through the MLP to predict the movie after that
position; prediction uses the last position.

Time (off by default, either mode): `position_bias` and `time_bias` add HSTU's learned relative
attention bias, per head and layer, looked up by the query-key distance in positions and by the
bucket of their log time gap. The query's time is that of its own input rating, or with
`query_time` that of the rating it predicts, the moment the recommendation is asked for, which
a deployed recommender knows; query time also adds an embedding of the gap between the two.

Features (off by default, the post's next steps): `movie_features` adds embeddings of each
movie's genres (summed), its release-year bucket and its text (title and genres through a
sentence-transformers model, text.py, projected to the model's width) to its token's,
`user_features` those of the user's age group, sex and occupation to the user embedding, and
`rating_input` an embedding of the stars the user gave each movie of the history to its
position's input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from keys import at_least, key, names_from, one_of, probability, rule
from ops import attention, dropout, gelu, small_table_lookup


MODES = ("window", "sequence")
INITS = ("post", "normal")  # init_weights' forms
MOVIE_FEATURES, USER_FEATURES = ("genres", "year", "text"), ("age", "sex", "occupation")
TEXT_OUTPUTS = ("none", "init", "add")  # what a movie's text does to its output embedding
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class TransformerConfig:
    vocab_size: int = key(3885, run=False)  # set from the data set
    context_window_size: int = key(5, at_least(1))
    embedding_dimension: int = key(32, at_least(1))
    num_layers: int = key(4, at_least(1))
    num_heads: int = key(4, at_least(1))
    embedding_dropout: float = key(0.1, probability)
    attention_dropout: float = key(0.1, probability)
    residual_dropout: float = key(0.1, probability)
    mlp_ratio: int = key(4, at_least(1))


@dataclass
class MovieLensTransformerConfig:
    transformer_config: TransformerConfig = field(default_factory=TransformerConfig)
    num_users: int = key(6040, run=False)  # set from the data set
    user_embedding_dimension: int = key(32, at_least(0))
    interaction_mlp_hidden_sizes: list[int] = key([16], rule(lambda v: all(h >= 1 for h in v),
                                                              "a list of sizes of at least 1"))
    mode: str = key("window", one_of(MODES))
    tie_output_embeddings: bool = key(False)   # output layer = movie embeddings (sequence mode)
    init: str = key("post", one_of(INITS))     # "post": uniform +-0.1; "normal": N(0, 0.02)
    position_bias: bool = key(False)           # attention bias by query-key distance
    time_bias: bool = key(False)               # attention bias by query-key log time gap
    query_time: bool = key(False)              # the time bias reads the predicted rating's time
    movie_features: list[str] = key([], names_from(MOVIE_FEATURES))
    text_model: str = key(DEFAULT_TEXT_MODEL)  # embeds each movie's text when movie_features has text
    # the text at the output too: init: output embeddings start as the text's principal components;
    # add: a second learned projection of the text is added to them (movie_features has text)
    text_output: str = key("none", one_of(TEXT_OUTPUTS))
    user_features: list[str] = key([], names_from(USER_FEATURES))
    rating_input: bool = key(False)            # each history movie's stars as an input

    @property
    def time_use(self) -> str:
        """What the model knows of time, which every results row states: a model with query time
        knows when the rating it predicts was made, one without does not."""
        return "query time" if self.query_time else "rating times" if self.time_bias else "none"


TIME_BUCKETS = 64  # ln(1 + seconds) / 0.301 (HSTU's step): 0 s, 1 s, ..., 3 years in 62; longer in the last


def time_buckets(gap: torch.Tensor) -> torch.Tensor:
    """The bucket of each time gap (seconds, its size only): floor(ln(1 + |gap|) / 0.301), at most
    TIME_BUCKETS - 1. Log buckets: a minute and two differ as much as a year and two."""
    return (torch.log1p(gap.abs().float()) / 0.301).long().clamp(max=TIME_BUCKETS - 1)


class RelativeBias(nn.Module):
    """A learned bias per head on each attention score, by the query-key distance in positions
    and/or the bucket of their time gap: [.., T, T] indices -> [.., H, T, T]."""

    def __init__(self, num_heads: int, context_window_size: int, position: bool, time: bool):
        super().__init__()
        self.position = nn.Embedding(context_window_size, num_heads) if position else None
        self.time = nn.Embedding(TIME_BUCKETS, num_heads) if time else None

    def forward(self, distance: Optional[torch.Tensor], gap: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [small_table_lookup(table.weight, index) for table, index in ((self.position, distance), (self.time, gap))
                 if table is not None]
        return sum(parts[1:], parts[0]).movedim(-1, -3)


STAR_STEPS = 11  # 0 (SOS) to 5 stars in half stars


@dataclass
class Features:
    """What the feature switches read, per token (data.movie_feature_tensors and
    DatasetMetadata.user_features): only those switched on are needed."""

    genres: Optional[torch.Tensor] = None   # float [vocab, G], multi-hot
    years: Optional[torch.Tensor] = None    # int64 [vocab], release-year bucket
    year_buckets: int = 0
    users: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> int64 [users]
    text: Optional[torch.Tensor] = None     # float [vocab, D], each movie's text embedding (text.py)


class MovieFeatures(nn.Module):
    """The sum of a movie's genre embeddings, its release-year embedding and its text embedding
    projected to the model's width: tokens -> [.., d]."""

    def __init__(self, names: list[str], features: Features, width: int):
        super().__init__()
        self.genre_embedding = self.year_embedding = self.text_projection = None
        if "genres" in names:
            self.register_buffer("genres", features.genres, persistent=False)
            self.genre_embedding = nn.Linear(features.genres.shape[1], width, bias=False)
        if "year" in names:
            self.register_buffer("years", features.years, persistent=False)
            self.year_embedding = nn.Embedding(features.year_buckets, width)
        if "text" in names:
            self.register_buffer("text", features.text, persistent=False)
            self.text_projection = nn.Linear(features.text.shape[1], width, bias=False)

    def forward(self, movie_tokens: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.genre_embedding is not None:
            parts.append(self.genre_embedding(self.genres[movie_tokens]))
        if self.year_embedding is not None:
            parts.append(self.year_embedding(self.years[movie_tokens]))
        if self.text_projection is not None:
            parts.append(self.text_projection(self.text[movie_tokens]))
        return sum(parts[1:], parts[0])


class UserFeatures(nn.Module):
    """The sum of the embeddings of a user's attributes (age group, sex, occupation): users -> [.., du]."""

    def __init__(self, names: list[str], features: Features, width: int):
        super().__init__()
        self.names = list(names)
        for name in self.names:
            self.register_buffer(f"{name}_tokens", features.users[name], persistent=False)
        self.embeddings = nn.ModuleDict({name: nn.Embedding(int(features.users[name].max()) + 1, width)
                                         for name in self.names})

    def forward(self, user_tokens: torch.Tensor) -> torch.Tensor:
        parts = [self.embeddings[name](getattr(self, f"{name}_tokens")[user_tokens]) for name in self.names]
        return sum(parts[1:], parts[0])


class Dropout(nn.Dropout):
    """nn.Dropout through ops.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class CausalMultiHeadAttention(nn.Module):
    def __init__(self, config: TransformerConfig, position_bias: bool = False, time_bias: bool = False):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embedding_dimension, 3 * config.embedding_dimension)
        self.out = nn.Linear(config.embedding_dimension, config.embedding_dimension)
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = Dropout(config.residual_dropout)
        self.relative_bias = (RelativeBias(config.num_heads, config.context_window_size, position_bias, time_bias)
                              if position_bias or time_bias else None)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                distance: Optional[torch.Tensor] = None, gap: Optional[torch.Tensor] = None) -> torch.Tensor:
        """attention_mask: bool [B, 1, T, T], True where a query may attend (causal already);
        distance and gap: the relative bias's indices (Transformer.relations)."""
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=2))
        bias = None if self.relative_bias is None else self.relative_bias(distance, gap)
        y = attention(q, k, v, attention_mask, self.attention_dropout if self.training else 0.0, bias)
        return self.residual_dropout(self.out(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.embedding_dimension
        self.fc = nn.Linear(config.embedding_dimension, hidden)
        self.proj = nn.Linear(hidden, config.embedding_dimension)
        self.dropout = Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(gelu(self.fc(x))))


class CausalTransformerBlock(nn.Module):
    """Pre-LayerNorm decoder block (GPT-2's): x + causal attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: TransformerConfig, position_bias: bool = False, time_bias: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.embedding_dimension)
        self.attention = CausalMultiHeadAttention(config, position_bias, time_bias)
        self.ln_2 = nn.LayerNorm(config.embedding_dimension)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                distance: Optional[torch.Tensor] = None, gap: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attention_mask, distance, gap)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Token + position embeddings, causal blocks, final LayerNorm: [B, T] -> [B, T, d]; with the
    relative position and time biases and query time where asked (the module's docstring)."""

    def __init__(self, config: TransformerConfig, position_bias: bool = False, time_bias: bool = False,
                 query_time: bool = False):
        super().__init__()
        self.config = config
        self.position_bias, self.time_bias, self.query_time = position_bias, time_bias, query_time
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dimension)
        self.position_embedding = nn.Embedding(config.context_window_size, config.embedding_dimension)
        self.gap_embedding = nn.Embedding(TIME_BUCKETS, config.embedding_dimension) if query_time else None
        self.dropout = Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(CausalTransformerBlock(config, position_bias, time_bias)
                                    for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embedding_dimension)

    @property
    def reads_time(self) -> bool:
        return self.time_bias or self.query_time

    def forward(self, batch, masked: bool, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The states [R, T, d] of a data.Batch's inputs: its movie tokens at its positions (0..T-1
        where it has none), plus extra [R, T, d] where given. masked: a position attends to the
        earlier ones of its own segment (batch.segments); else to every earlier position of its row.
        A model that reads time reads batch.times, and with query_time batch.query_times."""
        movie_tokens, positions = batch.movie_tokens, batch.positions
        t = movie_tokens.shape[1]
        if t > self.config.context_window_size:
            raise ValueError(f"input of length {t} exceeds context_window_size "
                             f"{self.config.context_window_size}")
        if positions is None:
            positions = torch.arange(t, device=movie_tokens.device)
        x = self.token_embedding(movie_tokens) + self.position_embedding(positions)
        if extra is not None:
            x = x + extra
        times = batch.times if self.reads_time else None
        query_times = batch.query_times if self.query_time else None
        if self.gap_embedding is not None:
            x = x + self.gap_embedding(time_buckets(query_times - times))
        x = self.dropout(x)
        mask = attention_mask(batch.segments) if masked else None
        distance, gap = self.relations(positions, times, query_times)
        for layer in self.layers:
            x = layer(x, mask, distance, gap)
        return self.ln_f(x)

    def relations(self, positions: torch.Tensor, times: Optional[torch.Tensor],
                  query_times: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The relative bias's indices [.., T, T], computed once for all layers: each query's
        distance to each key in positions, and the bucket of their time gap (None where unused)."""
        distance = gap = None
        if self.position_bias:
            distance = (positions[..., :, None] - positions[..., None, :]).clamp(0, self.config.context_window_size - 1)
        if self.time_bias:
            gap = time_buckets((query_times if self.query_time else times)[:, :, None] - times[:, None, :])
        return distance, gap


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T], True where a query may attend: the earlier positions of its own segment
    (segments [B, T], -1 at padding). Padding attends to itself only, so no softmax row is empty."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) & (segments >= 0)[:, None, :]
    return ((causal & same) | torch.eye(t, dtype=torch.bool, device=segments.device))[:, None]


class InteractionMLP(nn.Module):
    """Linear+ReLU layers of the given hidden sizes, then a bias-free projection to logits."""

    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip([input_size, *hidden_sizes], hidden_sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(([input_size, *hidden_sizes])[-1], output_size, bias=False))
        self.net = nn.Sequential(*layers)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input after every layer but the projection to logits."""
        for layer in self.net[:-1]:
            x = layer(x)
        return x


class MovieLensTransformer(nn.Module):
    """Logits over all movies for the movie that follows the input."""

    def __init__(self, config: MovieLensTransformerConfig, features: Optional[Features] = None):
        super().__init__()
        self.config = config
        tc = config.transformer_config
        if (config.movie_features or config.user_features) and features is None:
            raise ValueError("movie_features and user_features need the data set's Features")
        self.transformer = Transformer(tc, config.position_bias, config.time_bias, config.query_time)
        self.user_embedding = nn.Embedding(config.num_users, config.user_embedding_dimension)
        self.movie_features = (MovieFeatures(config.movie_features, features, tc.embedding_dimension)
                               if config.movie_features else None)
        self.user_features = (UserFeatures(config.user_features, features, config.user_embedding_dimension)
                              if config.user_features else None)
        self.rating_embedding = nn.Embedding(STAR_STEPS, tc.embedding_dimension) if config.rating_input else None
        width = tc.embedding_dimension + config.user_embedding_dimension
        if config.mode == "window":
            width *= tc.context_window_size
        self.interaction_mlp = InteractionMLP(width, config.interaction_mlp_hidden_sizes, tc.vocab_size)
        output = self.interaction_mlp.net[-1]  # its weight holds each movie's output embedding
        self.text_output = (nn.Linear(features.text.shape[1], output.in_features, bias=False)
                            if config.text_output == "add" else None)
        self.apply(init_weights if config.init == "post" else init_weights_normal)
        if config.tie_output_embeddings:  # config.check_values: the last hidden size is the embedding's
            output.weight = self.transformer.token_embedding.weight
        if config.text_output == "init":  # SOS and EOS, the last two tokens, have no text: they keep theirs
            with torch.no_grad():
                movies = output.weight[:-2]
                movies.copy_(text_components(features.text[:-2], output.in_features, movies.std()))

    def _inputs(self, batch) -> Optional[torch.Tensor]:
        """What the feature switches add to each input's embedding: [R, T, d], or None."""
        parts = []
        if self.movie_features is not None:
            parts.append(self.movie_features(batch.movie_tokens))
        if self.rating_embedding is not None:
            parts.append(self.rating_embedding((batch.ratings * 2).round().long().clamp(0, STAR_STEPS - 1)))
        return sum(parts[1:], parts[0]) if parts else None

    def _features(self, batch, masked: bool) -> torch.Tensor:
        """[state || user embedding] at every position: [R, T, d + du]."""
        states = self.transformer(batch, masked, self._inputs(batch))
        users = self.user_embedding(batch.user_tokens)
        if self.user_features is not None:
            users = users + self.user_features(batch.user_tokens)
        if batch.user_tokens.dim() == 1:
            users = users[:, None, :].expand(-1, batch.movie_tokens.shape[1], -1)
        return torch.cat([states, users], dim=-1)

    def hidden(self, batch) -> torch.Tensor:
        """[N, H]: the interaction MLP's last hidden layer for the movie after each of a data.Batch's
        predicting positions (batch.predict; by default the last of each row), which
        output_weight turns into logits. The model's one entry point: it reads the batch's fields
        by name.

        The window mode flattens the states of the whole window, its SOS padding read as tokens,
        into one MLP input a row; the sequence mode masks the padding and reads each predicting
        position's own state."""
        if self.config.mode == "window":
            b, t = batch.movie_tokens.shape
            if t != self.config.transformer_config.context_window_size:
                raise ValueError(f"window of length {t}; the model takes exactly "
                                 f"{self.config.transformer_config.context_window_size}")
            return self.interaction_mlp.hidden(self._features(batch, masked=False).reshape(b, -1))
        features = self._features(batch, masked=True)
        return self.interaction_mlp.hidden(features[:, -1] if batch.predict is None else features[batch.predict])

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab, H]: logits = hidden @ output_weight.T (the movie embeddings when tied, plus the
        projected text with text_output add)."""
        weight = self.interaction_mlp.net[-1].weight
        if self.text_output is None:
            return weight
        return weight + self.text_output(self.movie_features.text)

    def forward(self, batch) -> torch.Tensor:
        """[N, vocab] logits for the movie after each predicting position of a data.Batch (see hidden)."""
        return nn.functional.linear(self.hidden(batch), self.output_weight)


def text_components(text: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """[movies, width]: each movie's text vector on the texts' first `width` principal directions
    (zeros past the text's own size), scaled to std: movies whose titles read alike start with
    alike output embeddings, at the initialisation's scale."""
    centred = text - text.mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)
    scores = centred @ directions[:width].T
    scores = scores * (std / scores.std())
    return nn.functional.pad(scores, (0, width - scores.shape[1]))


def _init_weights(module: nn.Module, fill) -> None:
    """fill() the weights of Linear and Embedding layers; zero the biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        fill(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_weights(module: nn.Module) -> None:
    """The post's initialisation: weights uniform in [-0.1, 0.1], biases zero."""
    _init_weights(module, lambda w: nn.init.uniform_(w, -0.1, 0.1))


def init_weights_normal(module: nn.Module) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases zero."""
    _init_weights(module, lambda w: nn.init.normal_(w, std=0.02))

