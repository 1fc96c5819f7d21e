"""The built-in offline task: which digits does a sentence of spelled-out digits mention, in order.

"digits: seven two nine two" -> "279". A small seq2seq problem (recognize words at the byte level, emit
the set in canonical order) that a tiny T5 learns in a few hundred CPU steps, so a fresh machine shows
training working end to end without downloads. Every example is a pure function of (seed, index): the
held-out examples use indices the training set never reaches.
"""

from __future__ import annotations

import random

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_WORDS, MAX_WORDS = 3, 8
PREFIX = "digits: "


def example(seed: int, index: int) -> tuple[str, str]:
    rng = random.Random(f"{seed}:{index}")
    digits = [rng.randrange(10) for _ in range(rng.randint(MIN_WORDS, MAX_WORDS))]
    return PREFIX + " ".join(WORDS[d] for d in digits), "".join(str(d) for d in sorted(set(digits)))


def pairs(seed: int, start: int, count: int) -> list[tuple[str, str]]:
    return [example(seed, index) for index in range(start, start + count)]
