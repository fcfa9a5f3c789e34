"""Paired bootstrap intervals of Rouge-L differences between two methods of the same student size.

The evaluate stages score every prompt once per sampling seed (eval/<name>/<set>.jsonl: one row per seed and
prompt, in the same prompt order for every model), so two models are paired by (training seed, sampling seed,
prompt). For an evaluation set the statistic is the mean over those triples of A - B; for the average it is the
mean of the per-set statistics, as Table 1's Avg. Each bootstrap resample draws, with replacement, the training
seeds, the sampling seeds and, within each set, the prompts, the same draw for both models; the interval is the
2.5th and 97.5th percentiles of the resampled statistic. A difference is significant when the interval excludes 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESAMPLES = 2000


def scores_by_seed(lines) -> np.ndarray:
    """Rouge-L [sampling seeds, prompts] from the lines of a predictions file, seeds in the order they appear."""
    by_seed: dict[int, list[float]] = {}
    for line in lines:
        row = json.loads(line)
        by_seed.setdefault(row["seed"], []).append(row["rouge_l"])
    return np.array(list(by_seed.values()), dtype=np.float64)


def read_scores(prediction_dir: Path, sets: list[str]) -> dict[str, np.ndarray]:
    """{set: Rouge-L [sampling seeds, prompts]} from a predictions directory."""
    scores = {}
    for set_name in sets:
        with open(prediction_dir / f"{set_name}.jsonl", encoding="utf-8") as handle:
            scores[set_name] = scores_by_seed(handle)
    return scores


@dataclass(frozen=True)
class Interval:
    difference: float  # the statistic on the data itself
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def paired_bootstrap(differences: dict[str, np.ndarray], seed: int, resamples: int = RESAMPLES) -> dict[str, Interval]:
    """{set: Interval, "average": Interval} from per-set paired differences A - B, each [training seeds, sampling
    seeds, prompts] (every set with the same seeds)."""
    rng = np.random.default_rng(seed)
    sets = list(differences)
    train_seeds, sampling_seeds = differences[sets[0]].shape[:2]
    resampled = {name: np.empty(resamples) for name in sets}
    for index in range(resamples):
        train = rng.integers(0, train_seeds, train_seeds)
        sampling = rng.integers(0, sampling_seeds, sampling_seeds)
        for name in sets:
            prompts = rng.integers(0, differences[name].shape[2], differences[name].shape[2])
            resampled[name][index] = differences[name][np.ix_(train, sampling, prompts)].mean()
    average = np.mean([resampled[name] for name in sets], axis=0)
    intervals = {}
    for name, values in [*resampled.items(), ("average", average)]:
        observed = float(np.mean([differences[s].mean() for s in sets])) if name == "average" else float(differences[name].mean())
        low, high = np.percentile(values, [2.5, 97.5])
        intervals[name] = Interval(observed, float(low), float(high))
    return intervals


def compare(scores: dict[tuple, dict[str, np.ndarray]], method: str, reference: str, student: str,
            seed: int) -> dict[str, Interval] | None:
    """method - reference for one student size, paired by the training seeds both have; None when they share none.
    `scores`: {(method, student, train seed): {set: [sampling seeds, prompts]}}."""
    train_seeds = sorted(k for (m, s, k) in scores if m == method and s == student
                         and (reference, student, k) in scores)
    if not train_seeds:
        return None
    sets = list(scores[(method, student, train_seeds[0])])
    differences = {name: np.stack([scores[(method, student, k)][name] - scores[(reference, student, k)][name]
                                   for k in train_seeds]) for name in sets}
    return paired_bootstrap(differences, seed)
