"""Each movie's text as a vector: its title and genres embedded by a sentence-transformers model.

A title says what an id cannot: "Star Wars: Episode VI" sits beside "Episode V" before anyone has
rated it, and a pretrained language model knows something of famous films. The vectors are
computed once per data folder and model (seconds for ML-1M's titles on a CPU: benchmarks/README.md)
and kept beside the data cache, keyed by the model's name and the texts, so that training, eval and
recommend read them back. sentence-transformers is imported only when text is asked for.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from loguru import logger

from data import DatasetMetadata
from errors import ConfigError, UserError
from files import atomic_write, torch_save

KEY = "model_config.text_model"


def movie_texts(metadata: DatasetMetadata) -> list[str]:
    """Each token's text, "Title (year). Genre, Genre"; SOS and EOS (the last two tokens) have none."""
    return [f"{title}. {genres.replace('|', ', ')}" if title else ""
            for title, genres in zip(metadata.titles, metadata.genres)] + ["", ""]


def cache_path(folder: Path, model_name: str, texts: list[str]) -> Path:
    """The cache file of these texts under this model: another model, another title, or other files
    in a local model folder (new weights under the same path) is another file."""
    digest = hashlib.sha1("\n".join([model_name, *model_files(model_name), *texts]).encode()).hexdigest()[:16]
    return folder / f".movielens_text_{digest}.pt"


def model_files(model_name: str) -> list[str]:
    """A local model folder's files with their sizes and times; nothing for a Hub name."""
    folder = Path(model_name)
    if not folder.is_dir():
        return []
    return [f"{path.relative_to(folder)} {path.stat().st_size} {path.stat().st_mtime_ns}"
            for path in sorted(folder.rglob("*")) if path.is_file()]


def text_embeddings(metadata: DatasetMetadata, model_name: str, cache_folder: Optional[Path]) -> torch.Tensor:
    """float32 [vocab, D]: each movie's text embedding (unit length), zeros for SOS and EOS; read
    from cache_folder when it holds them, else computed and kept there (a folder that cannot be
    written is warned about once, and the vectors are used without being kept)."""
    texts = movie_texts(metadata)
    path = cache_path(cache_folder, model_name, texts) if cache_folder is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a broken cache is computed anew, never trusted
            logger.warning(f"ignoring unreadable text cache {path}: {e}")
    vectors = embed(texts, model_name)
    if path is not None:
        try:
            atomic_write(path, lambda tmp: torch_save(vectors, tmp))
        except UserError as e:
            logger.warning(f"{e}; going on without keeping the text vectors")
    return vectors


def embed(texts: list[str], model_name: str) -> torch.Tensor:
    """The texts through the sentence-transformers model `model_name` (a Hub name or a local
    folder), on the CPU: a few thousand short titles do not need a GPU."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("model_config.movie_features asks for text, which needs sentence-transformers: "
                          "pip install -r requirements.txt") from None
    try:
        model = SentenceTransformer(model_name, device="cpu")
    except Exception as e:  # no network, a wrong name, a folder that is no such model
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{KEY} {model_name!r} cannot be loaded ({reason}); give a name on the Hugging Face Hub "
                          f"with the network reachable, or a local folder holding a sentence-transformers model "
                          f"(one written by SentenceTransformer.save)") from None
    named = [i for i, text in enumerate(texts) if text]
    encoded = model.encode([texts[i] for i in named], batch_size=128, convert_to_tensor=True,
                           normalize_embeddings=True, show_progress_bar=False).float().cpu()
    vectors = torch.zeros(len(texts), encoded.shape[1])
    vectors[named] = encoded
    return vectors
