"""The labelled finance headlines the sentiment models train on, and the vocabulary built from them.

``data/headlines.jsonl`` holds 300 lines ``{"text", "label"}``, 100 per label: 120 hand-written headlines about
fictional companies and 180 drawn from templates (negative, neutral and positive phrasings of results,
guidance, ratings, dividends, corporate events). It ships with the package; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from workers.models.sentiment import LABELS, tokenize

DATA_FILE = Path(__file__).parent / "data" / "headlines.jsonl"


@dataclass(frozen=True)
class Headline:
    text: str
    label: str

    @property
    def label_id(self) -> int:
        return LABELS.index(self.label)


def load_headlines(path: Path | None = None) -> list[Headline]:
    """Every labelled headline of ``path`` (the shipped set by default), in file order."""
    rows = []
    with open(path or DATA_FILE, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("label") not in LABELS or not isinstance(record.get("text"), str):
                raise ValueError(f"{path or DATA_FILE}:{number}: needs a text and a label in {LABELS}")
            rows.append(Headline(record["text"], record["label"]))
    return rows


def stratified_split(rows: list[Headline], heldout_fraction: float,
                     seed: int) -> tuple[list[Headline], list[Headline]]:
    """``(train, heldout)`` with the same label mix in both; deterministic for a seed."""
    rng = random.Random(seed)
    train: list[Headline] = []
    heldout: list[Headline] = []
    for label in LABELS:
        group = [r for r in rows if r.label == label]
        rng.shuffle(group)
        cut = max(1, round(len(group) * heldout_fraction))
        heldout += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    return train, heldout


def build_vocab(texts: list[str], min_count: int = 1, max_size: int = 20000) -> list[str]:
    """Words of ``texts`` seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
    counts = Counter(tok for text in texts for tok in tokenize(text))
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:max_size]
