"""The training text of the main job: generated here, shipped as ``triton_adadelta/data/corpus.txt``.

The text is written by a small seeded grammar (our own, placed in the public domain), not taken
from anywhere: short stories of a village, its people, animals and trades, with counting and
simple sums spelled out in words. It has the local structure a character-level language model
learns within a few hundred steps (spelling, agreement, recurring phrases, arithmetic facts)
and enough variety that it does not memorise it within a run.

    python -m triton_adadelta.corpus            # rewrites data/corpus.txt (deterministic)
"""

from __future__ import annotations

import os
import random
from importlib import resources

__all__ = ["generate", "load", "CORPUS_SEED", "CORPUS_CHARS"]

CORPUS_SEED = 1789
CORPUS_CHARS = 320_000

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_PEOPLE = ["the miller", "the baker", "the smith", "the weaver", "the shepherd", "the old fisherman",
           "the young carpenter", "the potter", "the ferryman", "the schoolteacher", "the innkeeper",
           "the widow", "the farmer's daughter", "the cooper", "the tanner", "the clockmaker"]
_NAMES = ["Anna", "Tomas", "Elin", "Marek", "Sofia", "Piet", "Greta", "Ivo", "Lena", "Oskar", "Maja", "Jonas"]
_ANIMALS = ["the grey goose", "a brown hen", "the black dog", "two white goats", "the lame horse", "a red fox",
            "the barn cat", "an old ox", "the spotted cow", "a flock of sheep"]
_THINGS = ["sacks of grain", "loaves of bread", "iron nails", "bolts of linen", "baskets of apples",
           "jars of honey", "bundles of wood", "barrels of cider", "wheels of cheese", "bales of wool",
           "clay pots", "wooden spoons"]
_PLACES = ["to the mill", "to the market", "across the river", "up the hill", "to the chapel", "into the forest",
           "along the old road", "to the harbour", "behind the inn", "to the far meadow", "over the stone bridge"]
_TIMES = ["at dawn", "before noon", "in the evening", "after the rain", "on market day", "at first frost",
          "when the bells rang", "late at night", "in early spring", "at harvest time"]
_WEATHER = ["The wind came from the north", "A cold rain fell on the roofs", "The sun was warm on the square",
            "Fog lay low over the river", "Snow covered the fields", "The sky was clear and pale",
            "Thunder rolled behind the hills"]
_ADJ = ["tired", "cheerful", "careful", "hungry", "quiet", "stubborn", "patient", "worried", "proud", "kind"]
_VERBS = ["carried", "sold", "counted", "mended", "gave away", "bought", "stacked", "lost", "found", "weighed"]
_SAYINGS = ["\"A full barn makes a quiet winter,\" said {p}.", "\"Count twice and carry once,\" said {p}.",
            "\"The river keeps no secrets,\" {p} said softly.", "\"Bread tomorrow needs grain today,\" said {p}.",
            "\"Mind the bridge in the dark,\" {p} warned."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    person = rng.choice(_PEOPLE + _NAMES)
    if kind < 0.30:
        n = rng.randint(2, 12)
        return f"{_cap(person)} {rng.choice(_VERBS)} {_NUMBERS[n]} {rng.choice(_THINGS)} " \
               f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}."
    if kind < 0.45:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return f"{_cap(person)} had {_NUMBERS[a]} and was given {_NUMBERS[b]}, so now there were " \
               f"{_NUMBERS[a + b]}."
    if kind < 0.55:
        a = rng.randint(1, 20)
        b = rng.randint(0, a)
        return f"Of {_NUMBERS[a]} {rng.choice(_THINGS)}, {_NUMBERS[b]} were sold and {_NUMBERS[a - b]} were left."
    if kind < 0.68:
        return f"{_cap(rng.choice(_ANIMALS))} followed {person} {rng.choice(_PLACES)}."
    if kind < 0.78:
        return f"{rng.choice(_WEATHER)}, and {person} was {rng.choice(_ADJ)}."
    if kind < 0.88:
        return rng.choice(_SAYINGS).format(p=person)
    other = rng.choice(_PEOPLE + _NAMES)
    return f"{_cap(person)} asked {other} for {rng.choice(_THINGS)}, but {other} had none left."


def generate(chars: int = CORPUS_CHARS, seed: int = CORPUS_SEED) -> str:
    """The corpus: paragraphs of 3 to 7 sentences until at least ``chars`` characters (deterministic)."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < chars:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(para)
        total += len(para) + 2
    return "\n\n".join(paragraphs) + "\n"


def load() -> str:
    """The shipped corpus (``triton_adadelta/data/corpus.txt``); generated afresh if it is missing."""
    try:
        return resources.files("triton_adadelta").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return generate()


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = generate()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(text)} characters to {path}")


if __name__ == "__main__":
    main()
