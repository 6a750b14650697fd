"""The toy two-domain JSONL corpus of the text-path tests: recipes (source) and gardening
(target) documents drawn from two word lists that share nothing, so every text metric has
something to separate."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "recipes": "stir the flour with butter and sugar then bake the dough in a hot oven until golden "
               "add salt pepper garlic onion simmer the sauce serve warm with bread".split(),
    "gardening": "water the seedlings in spring prune the roses after bloom dig compost into the soil "
                 "plant tomato seeds in sunny beds mulch weeds harvest beans".split(),
}


def write_corpus(path: Path, docs_per_domain: int = 160) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for domain, words in WORDS.items():
            for _ in range(docs_per_domain):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + "."
                fh.write(json.dumps({"text": text, "domain": domain}) + "\n")
