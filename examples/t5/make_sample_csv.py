"""Write a small wikihow-format CSV (headline,title,text) for trying the walk-through offline.

The real wikihowAll.csv (~600 MB, the FSDP blog's data) has one how-to article per row: ``text`` holds the
steps, ``headline`` their bolded first sentences. These articles are generated from templates with the
same structure, so ``headline`` is a genuine (extractive) summary of ``text``. Deterministic per --seed.

    python examples/t5/make_sample_csv.py data/wikihow_sample.csv --rows 2000
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TASKS = ["bake bread", "paint a fence", "plant tomatoes", "fix a bike chain", "write a cover letter",
         "clean a keyboard", "brew coffee", "train a puppy", "tie a tie", "start a budget", "learn to juggle",
         "organize a closet", "change a tire", "make a kite", "study for an exam", "build a birdhouse"]
STEPS = ["Gather {a} and {b}.", "Clear a space to work in.", "Measure the {a} carefully.", "Mix the {a} with the {b}.",
         "Check the {b} twice.", "Ask a friend to hold the {a}.", "Let the {a} rest for an hour.",
         "Clean up the {b} when you finish.", "Practice with the {a} every day.", "Write down what you used."]
NOUNS = ["tools", "flour", "paint", "water", "tape", "notes", "gloves", "brushes", "seeds", "cloth", "rope", "wood"]
FILLER = ["This makes the next part easier.", "Take your time here.", "Most people skip this, but it helps.",
          "You can buy these at most stores.", "Do not rush this part.", "It should take a few minutes."]


def article(rng: random.Random) -> tuple[str, str, str]:
    task = rng.choice(TASKS)
    steps = [step.format(a=rng.choice(NOUNS), b=rng.choice(NOUNS)) for step in rng.sample(STEPS, rng.randint(2, 4))]
    paragraphs = [f"{step} {' '.join(rng.sample(FILLER, rng.randint(1, 2)))}" for step in steps]
    return "\n".join(steps), f"How to {task.capitalize()}", "\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["headline", "title", "text"])
        writer.writerows(article(rng) for _ in range(args.rows))
    print(f"wrote {args.rows} articles to {args.out}")


if __name__ == "__main__":
    main()
