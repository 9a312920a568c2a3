"""Three tiny, seeded, synthetic text tasks for a decoder LM (SmolLM2), built in code.

Why synthetic: the point is an end-to-end merge of real LoRA fine-tunes of a real LM, offline
and in minutes on a CPU. Each task is a distinct behaviour the base does not have and a few
dozen LoRA steps teach: an answer *style* (``shout``: repeat the phrase in upper case), a
*format* (``json``: a record as one JSON object) and a *word mapping* (``french``: English words
to French, word by word). Each example is a (prompt, answer) pair; the prompt starts with the
task's own cue, so one merged model can serve all three, and losses count answer tokens only.
Train and held-out examples come from disjoint seeded draws (a held-out text never occurs in
the train set).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = ("red", "blue", "green", "small", "big", "old", "new", "cold", "warm", "happy", "quiet",
         "cat", "dog", "bird", "house", "tree", "river", "road", "book", "door", "window",
         "apple", "bread", "water", "sun", "moon", "star", "city", "garden", "friend")
VERBS = ("sleeps", "runs", "waits", "sings", "falls", "shines", "stays", "moves", "grows")
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nadia", "Omar", "Petra", "Quinn", "Rosa", "Sami", "Tara")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Quito", "Rome", "Accra", "Seoul")
FRENCH = {"cat": "chat", "dog": "chien", "bird": "oiseau", "house": "maison", "tree": "arbre",
          "river": "rivière", "road": "route", "book": "livre", "door": "porte",
          "window": "fenêtre", "apple": "pomme", "bread": "pain", "water": "eau",
          "sun": "soleil", "moon": "lune", "star": "étoile", "city": "ville",
          "garden": "jardin", "friend": "ami", "red": "rouge", "blue": "bleu", "green": "vert"}


def _shout(rng: random.Random) -> tuple[str, str]:
    phrase = f"the {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(VERBS)}"
    return f"Shout: {phrase}\n", phrase.upper()


def _json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    return (f"Record: {name}, {age}, {city}\n",
            f'{{"name": "{name}", "age": {age}, "city": "{city}"}}')


def _french(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(sorted(FRENCH), 3)
    return f"French: {', '.join(words)}\n", ", ".join(FRENCH[w] for w in words)


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "shout": _shout, "json": _json, "french": _french}
TASK_NAMES = tuple(MAKERS)


@dataclass(frozen=True)
class LMTask:
    """One task: its train and held-out (prompt, answer) pairs."""

    name: str
    train: tuple[tuple[str, str], ...]
    heldout: tuple[tuple[str, str], ...]

    def calibration_texts(self, n: int) -> list[str]:
        """Unlabelled full texts (prompt + answer) for LOT's features: train examples only."""
        return [p + a for p, a in self.train[:n]]


def make_task(name: str, n_train: int, n_heldout: int, seed: int = 0) -> LMTask:
    """``n_train`` + ``n_heldout`` distinct examples, seeded by (seed, task name)."""
    if name not in MAKERS:
        raise ValueError(f"unknown LM task '{name}'; known: {', '.join(TASK_NAMES)}")
    rng = random.Random(f"{seed}:{name}")
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[str, str]] = []
    for _ in range(100 * (n_train + n_heldout)):
        pair = MAKERS[name](rng)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
        if len(pairs) == n_train + n_heldout:
            break
    else:
        raise ValueError(f"task '{name}' has fewer than {n_train + n_heldout} distinct examples")
    return LMTask(name, tuple(pairs[n_heldout:]), tuple(pairs[:n_heldout]))
