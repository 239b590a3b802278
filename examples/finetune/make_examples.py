"""Write the example fine-tuning datasets of this folder, deterministically.

    python examples/finetune/make_examples.py     # rewrites the four files next to this script

- ``sentiment_{train,validation}.csv`` (``sentence,label``; 1 positive, 0 negative): short
  synthetic movie reviews. Most are lexical ("the plot was gripping"), but about a quarter need
  word order: a negation flips the adjective ("was not gripping"), and in "X was A but Y was B"
  the clause after "but" decides. A bag of words cannot get those right, a transformer can.
- ``similarity_{train,validation}.jsonl`` (``sentence1, sentence2, score``): an STS-B-style
  regression. Sentence 2 copies sentence 1's four content slots and replaces some of them; the
  score (0-5, a float) is 1.25 per slot kept, plus a little noise. Replacement words come from
  their own word lists, so a model can also score a pair by spotting them in sentence 2: that
  shortcut makes the task learnable by a tiny model trained from scratch in seconds, which is
  what this smoke-test dataset is for (real STS-B needs a pre-trained model).

Standard library only; the same files on every machine and Python version (``random.Random``
with a fixed seed is stable across versions for ``random()``, ``choice`` and ``shuffle``).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = (
    "the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending",
    "the cast", "the story", "the dialogue", "this sequel", "the script", "the camera work",
    "the lead actor", "the first half", "the finale", "the pacing",
)  # fmt: skip
POSITIVE = (
    "great", "wonderful", "brilliant", "moving", "delightful", "superb", "charming",
    "gripping", "funny", "beautiful", "clever", "fresh", "memorable", "touching",
)  # fmt: skip
NEGATIVE = (
    "dull", "boring", "awful", "clumsy", "tedious", "forgettable", "painful", "messy",
    "bland", "predictable", "lazy", "confusing", "stale", "weak",
)  # fmt: skip
INTENSIFIERS = ("", "", "really ", "truly ", "quite ", "so ", "very ")
OPENERS = ("", "", "", "honestly, ", "overall ", "i thought ", "to be fair, ", "sadly ")

ADJECTIVES = ("red", "small", "old", "quiet", "happy", "tall", "young", "lazy", "bright", "cold")
NOUNS = ("dog", "cat", "man", "woman", "child", "bird", "farmer", "doctor", "horse", "teacher")
VERBS = ("sees", "follows", "helps", "calls", "finds", "watches", "pushes", "greets")
OBJECTS = ("ball", "car", "house", "river", "tree", "door", "road", "boat", "garden", "train")
# Replacements in sentence 2 (disjoint from the lists above).
OTHER_ADJECTIVES = ("green", "large", "new", "loud", "angry", "short", "sleepy", "dark")
OTHER_NOUNS = ("girl", "boy", "fox", "sailor", "baker", "nurse", "pilot", "goat")
OTHER_VERBS = ("paints", "carries", "avoids", "cleans", "draws", "leaves")
OTHER_OBJECTS = ("window", "bridge", "hill", "wall", "fence", "lamp", "table", "field")


def review(rng: random.Random) -> tuple[str, int]:
    """One synthetic review and its label."""
    kind = rng.random()
    subject = rng.choice(SUBJECTS)
    opener = rng.choice(OPENERS)
    polarity = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
    if kind < 0.15:  # negation flips the adjective
        return f"{opener}{subject} was not {adjective}.", int(not polarity)
    if kind < 0.28:  # contrast: the clause after "but" decides
        first = rng.choice(NEGATIVE if polarity else POSITIVE)
        other = rng.choice([s for s in SUBJECTS if s != subject])
        return f"{subject} was {first} but {other} was {adjective}.", int(polarity)
    if kind < 0.55:  # two adjectives of the same polarity
        second = rng.choice([a for a in (POSITIVE if polarity else NEGATIVE) if a != adjective])
        intensifier = rng.choice(INTENSIFIERS)
        return f"{opener}{subject} is {intensifier}{adjective} and {second}.", int(polarity)
    intensifier = rng.choice(INTENSIFIERS)
    return f"{opener}{subject} was {intensifier}{adjective}.", int(polarity)


def similarity_pair(rng: random.Random) -> dict[str, object]:
    """Two sentences sharing some of their four content slots, and a 0-5 similarity score."""
    pools = (ADJECTIVES, NOUNS, VERBS, OBJECTS)
    others = (OTHER_ADJECTIVES, OTHER_NOUNS, OTHER_VERBS, OTHER_OBJECTS)
    first = [rng.choice(pool) for pool in pools]
    kept = rng.randint(0, 4)
    changed = rng.sample(range(4), 4 - kept)
    second = list(first)
    for slot in changed:
        second[slot] = rng.choice(others[slot])
    score = min(5.0, max(0.0, 1.25 * kept + rng.uniform(-0.2, 0.2)))

    def sentence(words: list[str]) -> str:
        return f"the {words[0]} {words[1]} {words[2]} the {words[3]}."

    return {"sentence1": sentence(first), "sentence2": sentence(second), "score": round(score, 2)}


def write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20250101)
    reviews = [review(rng) for _ in range(800)]
    write_csv(HERE / "sentiment_train.csv", reviews[:600])
    write_csv(HERE / "sentiment_validation.csv", reviews[600:])
    pairs = [similarity_pair(rng) for _ in range(500)]
    write_jsonl(HERE / "similarity_train.jsonl", pairs[:400])
    write_jsonl(HERE / "similarity_validation.jsonl", pairs[400:])


if __name__ == "__main__":
    main()
