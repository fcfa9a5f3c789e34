"""The study: does the methods' ranking hold over training seeds and over other synthetic worlds?

Each world is a value of `seed`, which changes the data, the tokenizer and the teacher. Each world runs the whole
pipeline, with several training seeds, as one DVC experiment; the report reads every experiment's per-prompt scores
back and asks, per world, where each method stands, and across worlds, whether any significant ordering flips.

    python -m pipeline.study queue      # one `dvc exp run --queue` per world of configs/study.yaml
    dvc queue start -j 1                # runs them (hours on 2 CPU cores; `dvc queue status` shows progress)
    python -m pipeline.study report     # reports/study.md and study.json

Intervals are paired bootstrap 95% intervals (pipeline/significance.py), resampling training seeds, sampling seeds
and prompts. A world's experiment is the commit DVC keeps under refs/exps/, named study-world<seed>; its predictions
are read from the DVC cache of this clone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from pipeline import significance
from pipeline.config import METHODS, ConfigError, exit_on_user_error
from pipeline.report import METHOD_NAMES, SIGNIFICANCE_REFERENCES
from pipeline.significance import Interval
from pipeline.tuning import git, latest_named_experiments

EXPERIMENT_NAME = re.compile(r"study-world(?P<world>\d+)")
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class StudyConfig:
    worlds: dict[int, tuple[int, ...]]  # world seed -> its training seeds
    metrics: str = ""  # the evaluate stages' metrics directory (dvc.yaml), in git
    predictions: str = ""  # and their predictions directory, in the DVC cache


def load_config(path: Path) -> StudyConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    content = yaml.safe_load(path.read_text()) or {}
    worlds = content.get("worlds")
    if not isinstance(worlds, dict) or not worlds:
        raise ConfigError(f"{path}: worlds: a mapping of world seed to its list of training seeds")
    for world, seeds in worlds.items():
        if not isinstance(world, int) or not isinstance(seeds, list) or not seeds \
                or not all(isinstance(v, int) for v in seeds):
            raise ConfigError(f"{path}: worlds: {world}: an integer world seed with a non-empty list of integer "
                              "training seeds")
    for key in ("metrics", "predictions"):
        if not isinstance(content.get(key), str):
            raise ConfigError(f"{path}: {key}: a directory of dvc.yaml's evaluate outputs")
    return StudyConfig({world: tuple(seeds) for world, seeds in worlds.items()}, content["metrics"],
                       content["predictions"])


def queue_commands(config: StudyConfig) -> list[list[str]]:
    """One `dvc exp run --queue` per world: the whole pipeline, with that world's seed and training seeds."""
    return [["dvc", "exp", "run", "--queue", "--name", f"study-world{world}", "-S", f"seed={world}",
             "-S", f"train_seeds={json.dumps(list(seeds))}"] for world, seeds in config.worlds.items()]


# --- reading the experiments back --------------------------------------------------------------------------------

def world_experiments(root: Path) -> dict[int, tuple[str, str]]:
    """{world seed: (commit, baseline)} of the study-world<seed> experiments on the latest baseline that has any."""
    baseline, found = latest_named_experiments(root, EXPERIMENT_NAME)
    return {world: (commit, baseline) for world, commit in found.items()}


def world_scores(root: Path, commit: str, config: StudyConfig) -> dict[tuple[str, str, int], dict[str, np.ndarray]]:
    """{(method, student, train seed): {set: Rouge-L [sampling seeds, prompts]}} of one experiment: the metrics files
    from git, the per-prompt predictions (DVC outputs) from the cache."""
    from dvc.api import DVCFileSystem

    # One filesystem for the experiment's commit: it indexes the commit once (seconds), where a dvc.api.read per
    # file re-opened the repository every time (minutes for a world's 120 prediction files).
    predictions = DVCFileSystem(str(root), rev=commit)
    scores = {}
    for path in git("ls-tree", "-r", "--name-only", commit, "--", config.metrics, root=root).split():
        metrics = json.loads(git("show", f"{commit}:{path}", root=root))
        if metrics["method"] == "teacher":
            continue
        name = Path(path).stem  # also the name of its predictions directory (dvc.yaml)
        scores[(metrics["method"], metrics["student"], metrics["train_seed"])] = {
            set_name: significance.scores_by_seed(
                predictions.read_text(f"{config.predictions}/{name}/{set_name}.jsonl").splitlines())
            for set_name in metrics["sets"]}
    if not scores:
        raise ConfigError(f"experiment {commit[:7]}: no evaluation metrics under {config.metrics}")
    return scores


# --- what a world shows ------------------------------------------------------------------------------------------

@dataclass
class WorldSummary:
    train_seeds: list[int]
    levels: dict[str, Interval]  # method -> its average Rouge-L over the sets, with its interval
    per_seed: dict[str, list[float]]  # method -> its average per training seed
    pairs: dict[tuple[str, str], Interval]  # (a, b) -> a - b on the average, every pair of methods once
    baseline: str = ""  # the commit the world's experiment ran on

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "train_seeds": self.train_seeds,
                "average": {m: [i.difference, i.low, i.high] for m, i in self.levels.items()},
                "per_train_seed": self.per_seed, "leaders": leaders(self),
                "pairs": [[a, b, i.difference, i.low, i.high] for (a, b), i in self.pairs.items()]}

    @classmethod
    def from_json(cls, content: dict) -> WorldSummary:
        return cls(content["train_seeds"], {m: Interval(*v) for m, v in content["average"].items()},
                   content["per_train_seed"], {(a, b): Interval(d, lo, hi) for a, b, d, lo, hi in content["pairs"]},
                   content["baseline"])


def in_method_order(methods) -> list[str]:
    wanted = set(methods)
    return [m for m in METHODS if m in wanted]


def summarize_world(scores: dict[tuple[str, str, int], dict[str, np.ndarray]], student: str,
                    baseline: str = "") -> WorldSummary:
    methods = in_method_order(m for (m, s, _) in scores if s == student)
    train_seeds = sorted({k for (m, s, k) in scores if s == student})
    levels, per_seed = {}, {}
    for method in methods:
        sets = scores[(method, student, train_seeds[0])]
        stacked = {name: np.stack([scores[(method, student, k)][name] for k in train_seeds]) for name in sets}
        levels[method] = significance.paired_bootstrap(stacked, BOOTSTRAP_SEED)["average"]  # a level: B = 0
        per_seed[method] = [float(np.mean([scores[(method, student, k)][name].mean() for name in sets]))
                            for k in train_seeds]
    pairs = {(a, b): significance.compare(scores, a, b, student, BOOTSTRAP_SEED)["average"]
             for a, b in itertools.combinations(methods, 2)}
    return WorldSummary(train_seeds, levels, per_seed, pairs, baseline)


def significant_orderings(summary: WorldSummary) -> set[tuple[str, str]]:
    """{(better, worse)}: the pairs whose difference is significant, winner first."""
    return {(a, b) if interval.difference > 0 else (b, a)
            for (a, b), interval in summary.pairs.items() if interval.significant}


def leaders(summary: WorldSummary) -> list[str]:
    """The methods no other method beats significantly: the world's statistically tied first places."""
    beaten = {worse for _, worse in significant_orderings(summary)}
    return [method for method in summary.levels if method not in beaten]


def flips(summaries: dict[int, WorldSummary]) -> list[tuple[str, str, int, int]]:
    """(a, b, world where a beats b significantly, world where b beats a significantly)."""
    found = []
    orderings = {world: significant_orderings(summary) for world, summary in summaries.items()}
    for world, other in itertools.combinations(sorted(orderings), 2):
        found += [(a, b, world, other) for a, b in sorted(orderings[world]) if (b, a) in orderings[other]]
    return found


def interval_text(interval: Interval, signed: bool = False) -> str:
    number = "{:+.2f}" if signed else "{:.2f}"
    star = "*" if signed and interval.significant else ""
    return f"{number.format(interval.difference)} [{number.format(interval.low)}, {number.format(interval.high)}]{star}"


def study_markdown(summaries: dict[str, dict[int, WorldSummary]], config_path: str) -> str:
    lines = ["# The study: does the ranking hold?", "",
             f"Worlds and training seeds: {config_path}. Each world is a value of `seed` (the data, the tokenizer and "
             "the teacher change with it) and runs the whole pipeline once per training seed, with params.yaml as "
             "committed otherwise. Avg. is the mean Rouge-L over the evaluation sets; intervals are paired bootstrap "
             f"95% intervals over training seeds, sampling seeds and prompts ({significance.RESAMPLES} resamples, "
             "pipeline/significance.py); `*`: the difference's interval excludes 0. Regenerate: "
             "`python -m pipeline.study queue`, `dvc queue start -j 1`, `python -m pipeline.study report`. A world run in "
             "another clone is carried over from the previous study.json; each world names the commit it ran on, and "
             "worlds compare only where params.yaml and the code are the same on theirs.", ""]
    for student, by_world in summaries.items():
        for world, summary in by_world.items():
            lines += [f"## Student {student}, world seed {world} (training seeds {summary.train_seeds}, "
                      f"commit {summary.baseline[:7]})", "",
                      "| Method | Avg. [95%] | per training seed | "
                      + " | ".join(f"vs {METHOD_NAMES[r]}" for r in SIGNIFICANCE_REFERENCES) + " |",
                      "|---" * (3 + len(SIGNIFICANCE_REFERENCES)) + "|"]
            for method, level in sorted(summary.levels.items(), key=lambda item: -item[1].difference):
                against = []
                for reference in SIGNIFICANCE_REFERENCES:
                    if method == reference or reference not in summary.levels:
                        against.append("")
                    elif (method, reference) in summary.pairs:
                        against.append(interval_text(summary.pairs[(method, reference)], signed=True))
                    else:
                        flipped = summary.pairs[(reference, method)]
                        against.append(interval_text(Interval(-flipped.difference, -flipped.high, -flipped.low), True))
                seeds = ", ".join(f"{value:.2f}" for value in summary.per_seed[method])
                lines.append(f"| {METHOD_NAMES[method]} | {interval_text(level)} | {seeds} | " + " | ".join(against) + " |")
            lines += ["", "Statistically tied first: " + ", ".join(METHOD_NAMES[m] for m in leaders(summary)) + ".", ""]
            if len(summary.train_seeds) == 1:
                lines += ["One training seed: these intervals hold the spread of sampling seeds and prompts only, not "
                          "that of training, so they are narrower than a multi-seed world's.", ""]
        lines += [f"## Student {student}: across worlds", ""]
        for world, summary in by_world.items():
            order = sorted(summary.levels, key=lambda m: -summary.levels[m].difference)
            lines.append(f"- world {world}: " + " > ".join(METHOD_NAMES[m] for m in order))
        reversed_pairs = flips(by_world)
        unstable = sorted(set.union(*(significant_orderings(s) for s in by_world.values()))
                          - set.intersection(*(significant_orderings(s) for s in by_world.values())))
        lines.append("")
        if len(by_world) < 2:
            lines.append("One world only: nothing to compare across worlds.")
        elif reversed_pairs:
            lines.append("**The ranking does not hold.** Significant in opposite directions: " + "; ".join(
                f"{METHOD_NAMES[a]} > {METHOD_NAMES[b]} in world {w}, the reverse in world {o}"
                for a, b, w, o in reversed_pairs) + ".")
        else:
            lines.append("**No significant ordering flips between worlds.**")
        if unstable and len(by_world) > 1:
            lines.append("Significant in some worlds only (not a flip, not a finding either): " + "; ".join(
                f"{METHOD_NAMES[a]} > {METHOD_NAMES[b]}" for a, b in unstable) + ".")
        lines.append("")
    return "\n".join(lines)


def merge_worlds(found: dict[str, dict[int, WorldSummary]], previous: dict) -> dict[str, dict[int, WorldSummary]]:
    """The worlds summarised now, and the previous report's summaries of the others: experiments live in one clone's
    refs/exps, so worlds run in another clone (or session) are carried over, each with the commit it ran on."""
    merged = {}
    for student in sorted(set(found) | set(previous)):
        worlds = {int(world): WorldSummary.from_json(content) for world, content in previous.get(student, {}).items()}
        merged[student] = dict(sorted((worlds | found.get(student, {})).items()))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["queue", "report"])
    parser.add_argument("worlds", nargs="*", type=int, help="queue: only these worlds of the config (default: all)")
    parser.add_argument("--config", default="configs/study.yaml")
    parser.add_argument("--out", default="reports", help="report: where study.md and study.json go")
    arguments = parser.parse_args()
    config = load_config(Path(arguments.config))
    if arguments.command == "queue":
        unknown = sorted(set(arguments.worlds) - set(config.worlds))
        if unknown:
            raise ConfigError(f"{arguments.config}: worlds: {unknown} not listed (worlds: {list(config.worlds)})")
        if arguments.worlds:
            config = replace(config, worlds={world: config.worlds[world] for world in arguments.worlds})
        for command in queue_commands(config):
            print(" ".join(command), flush=True)
            subprocess.run([sys.executable, "-m", *command], check=True)  # DVC of this interpreter's environment
        print("queued; run them with `dvc queue start -j 1`, then `python -m pipeline.study report`")
        return
    from pipeline.io import atomic_write_json, atomic_write_text

    root, out = Path("."), Path(arguments.out)
    experiments = world_experiments(root)
    previous = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    if not experiments and not previous:
        raise ConfigError("no study-world<seed> experiment found: run `python -m pipeline.study queue` first")
    found: dict[str, dict[int, WorldSummary]] = {}
    for world, (commit, baseline) in sorted(experiments.items()):
        scores = world_scores(root, commit, config)
        for student in sorted({s for (_, s, _) in scores}):
            found.setdefault(student, {})[world] = summarize_world(scores, student, baseline)
    summaries = merge_worlds(found, previous)
    atomic_write_text(out / "study.md", study_markdown(summaries, arguments.config))
    atomic_write_json(out / "study.json", {student: {str(w): summary.to_json() for w, summary in by_world.items()}
                                           for student, by_world in summaries.items()})
    print(f"wrote {out / 'study.md'}: worlds {sorted(experiments)} from this clone's experiments")


if __name__ == "__main__":
    exit_on_user_error(main)
