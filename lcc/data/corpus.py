"""The built-in corpus: English-like text generated deterministically from a small grammar.

It is the same bytes on every machine and every run (a fixed seed, pure Python), about 1 MiB, and has
structure at several scales for a byte-level model to learn: spelling, word order, agreement between a
subject and its verb, punctuation, and simple sums whose answers are right. Nothing is downloaded.
"""

from __future__ import annotations

import random
from functools import lru_cache

BUILTIN_BYTES = 1 << 20  # the corpus is exactly this long
NOUNS = ["cat", "dog", "bird", "river", "mountain", "teacher", "child", "engine", "garden", "city", "ship",
         "farmer", "letter", "window", "forest", "student", "machine", "market", "island", "painter"]
ADJECTIVES = ["small", "quiet", "bright", "old", "green", "heavy", "gentle", "busy", "cold", "distant",
              "careful", "golden", "empty", "strange", "patient"]
VERBS = [("sees", "see"), ("follows", "follow"), ("finds", "find"), ("builds", "build"), ("carries", "carry"),
         ("paints", "paint"), ("watches", "watch"), ("helps", "help"), ("remembers", "remember")]
ADVERBS = ["slowly", "quickly", "often", "never", "always", "quietly", "today", "again"]
PLACES = ["near the river", "in the garden", "behind the market", "under the old bridge", "at the edge of the city",
          "across the island", "inside the forest"]


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    plural = rng.random() < 0.3
    noun = rng.choice(NOUNS)
    if plural:
        noun = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    det = rng.choice(["the", "some", "many"]) if plural else rng.choice(["the", "a", "one", "every"])
    words = [det]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(noun)
    phrase = " ".join(words)
    if phrase.startswith("a ") and phrase[2] in "aeiou":
        phrase = "an " + phrase[2:]
    return phrase, plural


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} plus {b} is {a + b}."
    subject, plural = _noun_phrase(rng)
    verb = rng.choice(VERBS)[1 if plural else 0]
    obj, _ = _noun_phrase(rng)
    parts = [subject, verb, obj]
    if rng.random() < 0.4:
        parts.append(rng.choice(PLACES))
    if rng.random() < 0.3:
        parts.insert(2, rng.choice(ADVERBS))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"] if kind > 0.9 else ["."])


@lru_cache(maxsize=1)
def builtin_corpus(n_bytes: int = BUILTIN_BYTES) -> bytes:
    rng = random.Random(20261129)
    out: list[str] = []
    size = 0
    while size < n_bytes:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) + "\n"
        out.append(paragraph)
        size += len(paragraph)
    return "".join(out).encode("ascii")[:n_bytes]


def write_documents(path: str, per_document: int = 1 << 12) -> int:
    """The built-in corpus as JSON Lines documents ({"text": ...}, paragraphs gathered up to about
    `per_document` bytes) whose texts, one after another, are the corpus byte for byte: what `make demo`
    prepares with `lcc data prepare`. Returns the number of documents."""
    import json

    text, docs, start = builtin_corpus().decode("ascii"), [], 0
    while start < len(text):
        end = text.find("\n", start + per_document)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return len(docs)


if __name__ == "__main__":  # python -m lcc.data.corpus PATH.jsonl
    import sys

    print(f"wrote {sys.argv[1]}: {write_documents(sys.argv[1])} documents of the built-in corpus")
