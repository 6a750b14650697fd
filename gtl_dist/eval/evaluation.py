"""What every evaluation shares: the scored cells, the findings about identical sample sets, and
the Evaluation that collects rows, findings, examples and matrices."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence
from gtl_dist.config import RunConfig
from gtl_dist.eval.report import MarkovMatrices
from gtl_dist.eval.results import ResultRow
from gtl_dist.methods import METHODS

def sample_cells(cfg: RunConfig, target: str) -> list[tuple[str, Optional[str], Optional[float]]]:
    """(method, sample-folder target, fraction) of every sample set scored against ``target``."""
    cells = []
    for method in cfg.sample.methods:
        if METHODS[method].per_target:
            cells += [(method, target, f) for f in cfg.data.target_fractions]
        else:
            cells.append((method, None, None))
    return cells


@dataclass
class Evaluation:
    """What the evaluation found: result rows, findings in words (the report's "Checks"), a few
    decoded samples per sample set (text runs), and the sampled transition matrices (Markov)."""
    rows: list[ResultRow] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    matrices: dict[str, MarkovMatrices] = field(default_factory=dict)
    fingerprints: dict[str, list[str]] = field(default_factory=dict)  # tokens' hash -> set labels

    def saw(self, label: str, tokens: Sequence[Sequence[int]]) -> None:
        """Record one sample set (the source's, scored against every target, once)."""
        labels = self.fingerprints.setdefault(_fingerprint(tokens), [])
        if label not in labels:
            labels.append(label)

    def finish(self) -> "Evaluation":
        self.findings += identical_set_findings(self.fingerprints)
        return self


# Decoded samples shown per sample set (seed 0) in samples.md and TensorBoard.
EXAMPLES_PER_SET = 3

def _fingerprint(tokens: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, t)) for t in tokens]).encode()).hexdigest()


def set_label(method: str, target: Optional[str], fraction: Optional[float], seed: int) -> str:
    where = "" if target is None else f" {target} @ {fraction * 100:g}%"
    return f"{method}{where} (seed {seed})"


def identical_set_findings(fingerprints: Mapping[str, Sequence[str]]) -> list[str]:
    """One finding per group of sample sets with the same tokens: every set is drawn from its own
    networks or seed, so equal sets mean guidance or training changed nothing."""
    return [f"identical samples: {', '.join(labels)} drew exactly the same token "
            f"sequences; whatever distinguishes them (guidance, target, fraction, seed) changed nothing"
            for labels in fingerprints.values() if len(labels) > 1]


def sample_tokens(records: Sequence[dict]) -> list[list[int]]:
    return [r["tokens"] for r in records]
