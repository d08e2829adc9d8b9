"""Sentiment of finance headlines: a small bag-of-words-and-bigrams classifier.

Text becomes token ids with :func:`tokenize` and :func:`encode` (vocabulary in the config, built at training
time; ``0`` pads, ``1`` is an unknown word). The model averages word embeddings and hashed-bigram embeddings
over the real (non-padding) tokens, so "beats estimates" and "misses estimates" differ even when each word
alone is ambiguous, then an MLP gives logits over :data:`LABELS`.
"""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
PAD_ID = 0
UNK_ID = 1
#: Lower-case words, numbers (with decimals) and percentages; everything else separates tokens.
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?%?")


class SentimentConfig(BaseModel):
    """Vocabulary and sizes of a :class:`SentimentClassifier`."""

    model_config = ConfigDict(extra="forbid")

    vocab: list[str] = Field(default_factory=list)
    """Known words; word ``vocab[i]`` has id ``i + 2``."""
    max_len: int = Field(32, ge=1, le=512)
    """Tokens kept per text (longer texts are cut, shorter ones padded)."""
    embed_dim: int = Field(32, ge=1)
    hidden_dim: int = Field(32, ge=1)
    n_buckets: int = Field(4096, ge=2)
    """Hash buckets of the bigram embedding (bucket 0 is padding)."""
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    labels: list[str] = Field(default_factory=lambda: list(LABELS))

    @field_validator("labels")
    @classmethod
    def _fixed_labels(cls, labels: list[str]) -> list[str]:
        if tuple(labels) != LABELS:
            raise ValueError(f"labels must be {list(LABELS)}")
        return labels

    @field_validator("vocab")
    @classmethod
    def _unique(cls, vocab: list[str]) -> list[str]:
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab holds duplicate words")
        return vocab


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    return _TOKEN.findall(text.lower())


def encode(texts: list[str], vocab: list[str], max_len: int) -> torch.Tensor:
    """``[len(texts), max_len]`` int64 token ids, padded with 0; unknown words are 1."""
    index = {word: i + 2 for i, word in enumerate(vocab)}
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [index.get(tok, UNK_ID) for tok in tokenize(text)[:max_len]]
        if tokens:
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class SentimentClassifier(nn.Module):
    """``[B, T]`` token ids -> ``[B, 3]`` logits over negative / neutral / positive."""

    def __init__(self, config: SentimentConfig) -> None:
        super().__init__()
        self.n_buckets = config.n_buckets
        self.words = nn.Embedding(len(config.vocab) + 2, config.embed_dim, padding_idx=PAD_ID)
        self.bigrams = nn.Embedding(config.n_buckets, config.embed_dim, padding_idx=0)
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(2 * config.embed_dim, config.hidden_dim), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, len(config.labels)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids > 0  # PAD_ID (a literal: TorchScript cannot read module globals)
        unigrams = _masked_mean(self.words(ids), mask)
        left = ids[:, :-1]
        right = ids[:, 1:]
        pair_mask = mask[:, :-1] & mask[:, 1:]
        # Multiplicative hashing of (left, right) into buckets 1..n_buckets-1; padded pairs go to bucket 0.
        buckets = torch.remainder(left * 1000003 + right, self.n_buckets - 1) + 1
        buckets = buckets * pair_mask.to(buckets.dtype)
        bigrams = _masked_mean(self.bigrams(buckets), pair_mask)
        return self.classifier(torch.cat([unigrams, bigrams], dim=1))
