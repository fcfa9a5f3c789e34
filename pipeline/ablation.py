"""The paper's MiniLLM ablation as DVC experiments: each variant of configs/ablation.yaml is one param of
distill.minillm, run as `dvc exp run --queue` on top of the committed params; the report lays the variants out like
the paper's ablation table, next to the published DollyEval numbers.

    python -m pipeline.ablation queue      # one `dvc exp run --queue` per variant but `full` (the committed run)
    dvc queue start -j 1                   # reruns distill_minillm and its evaluation per variant
    python -m pipeline.ablation report     # reports/ablation.md

A variant's experiment is the commit DVC keeps under refs/exps/, named ablation-<n> (n: the variant's position in the
config); `full` is read from the experiments' baseline commit. Only MiniLLM's stages differ between variants.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import EVAL_SETS, ConfigError, exit_on_user_error
from pipeline.tuning import git, latest_named_experiments

EXPERIMENT_NAME = re.compile(r"ablation-(?P<index>\d+)")


@dataclass(frozen=True)
class AblationConfig:
    variants: dict[str, dict]  # name -> {dotted params key: value}; the first is the committed run
    paper: dict[str, float]
    metrics: str
    training_metrics: str
    training_curves: str  # plots/distill/minillm: <run>/valid.csv, the validation curve of each training run


def load_config(path: Path) -> AblationConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    content = yaml.safe_load(path.read_text()) or {}
    variants = content.get("variants")
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"{path}: variants: a mapping of variant name to its params overrides")
    if next(iter(variants.values())):
        raise ConfigError(f"{path}: variants: the first variant is the committed run and overrides nothing")
    for key in ("metrics", "training_metrics", "training_curves"):
        if not isinstance(content.get(key), str):
            raise ConfigError(f"{path}: {key}: a directory of dvc.yaml's metrics")
    return AblationConfig(variants, content.get("paper") or {}, content["metrics"], content["training_metrics"],
                          content["training_curves"])


def queue_commands(config: AblationConfig) -> list[list[str]]:
    commands = []
    for index, (name, overrides) in enumerate(config.variants.items()):
        if index == 0:
            continue
        sets = [part for key, value in overrides.items() for part in ("-S", f"{key}={json.dumps(value)}")]
        commands.append(["dvc", "exp", "run", "--queue", "--name", f"ablation-{index}", *sets])
    return commands


def experiments(root: Path) -> tuple[str, dict[int, str]]:
    """(baseline commit, {variant index: experiment commit}) of the ablation-<n> experiments on the latest baseline."""
    baseline, found = latest_named_experiments(root, EXPERIMENT_NAME)
    if not found:
        raise ConfigError("no ablation-<n> experiment found: run `python -m pipeline.ablation queue` first")
    return baseline, found


def variant_row(root: Path, commit: str, config: AblationConfig) -> dict:
    """The variant's MiniLLM evaluation (each set's mean over sampling seeds, averaged over students and training
    seeds), its training stages' best validation Rouge-L, and from their validation curves the step that best one
    was at and the last validation's Rouge-L (what the training did even where the selection kept the start)."""
    def files(directory: str, name: str = "") -> list[str]:
        paths = git("ls-tree", "-r", "--name-only", commit, "--", directory, root=root).split()
        return [git("show", f"{commit}:{path}", root=root) for path in paths if path.endswith(name)]

    def read(directory: str) -> list[dict]:
        return [json.loads(text) for text in files(directory)]

    evaluations = [m for m in read(config.metrics) if m.get("method") == "minillm"]
    if not evaluations:
        raise ConfigError(f"commit {commit[:7]}: no MiniLLM evaluation under {config.metrics}")
    sets = [s for s in EVAL_SETS if s in evaluations[0]["sets"]]
    row = {s: statistics.fmean(m["sets"][s]["rouge_l"] for m in evaluations) for s in sets}
    row["average"] = statistics.fmean(row[s] for s in sets)
    row["best_valid_rouge_l"] = statistics.fmean(m["best_valid_rouge_l"] for m in read(config.training_metrics))
    curves = [list(csv.DictReader(io.StringIO(text))) for text in files(config.training_curves, "valid.csv")]
    if not curves:
        raise ConfigError(f"commit {commit[:7]}: no valid.csv under {config.training_curves}")
    # The first point of the best Rouge-L: the one the training kept (a later tie does not replace it).
    kept = [max(curve, key=lambda point: float(point["valid_rouge_l"])) for curve in curves]
    row["kept_steps"] = ", ".join(point["step"] for point in kept)
    row["last_valid_rouge_l"] = statistics.fmean(float(curve[-1]["valid_rouge_l"]) for curve in curves)
    return row


def ablation_markdown(rows: dict[str, dict], config: AblationConfig, baseline: str, config_path: str) -> str:
    sets = [s for s in EVAL_SETS if s in next(iter(rows.values()))]
    lines = ["# The MiniLLM ablation", "",
             f"Variants: {config_path}, each one param of distill.minillm over params.yaml at commit {baseline[:7]}. "
             "Ours: MiniLLM's Rouge-L per evaluation set (mean over sampling seeds), its average over the sets, and "
             "the best validation Rouge-L its training kept, the step it was at (0: the start) and the last "
             "validation's Rouge-L; paper: MINILLM_SPEC.md §6 (GPT-2 1.5B -> 120M, DollyEval). Regenerate: "
             "`python -m pipeline.ablation queue`, `dvc queue start -j 1`, `python -m pipeline.ablation report`.", "",
             "| Variant | Paper DollyEval | " + " | ".join(sets) + " | Avg. | best valid | kept step | last valid |",
             "|---" * (6 + len(sets)) + "|"]
    for name, row in rows.items():
        paper = config.paper.get(name)
        lines.append(f"| {name} | {'' if paper is None else f'{paper:.1f}'} | "
                     + " | ".join(f"{row[s]:.2f}" for s in sets) + f" | {row['average']:.2f} | {row['best_valid_rouge_l']:.2f}"
                     f" | {row['kept_steps']} | {row['last_valid_rouge_l']:.2f} |")
    if all(set(row["kept_steps"].split(", ")) == {"0"} for row in rows.values()):
        lines += ["", "Every variant's training kept its start (step 0): no validation after it beat the start's, so "
                  "the evaluation columns are the start's, identical by construction, and say nothing about the "
                  "variants. The last validation column is what each variant's training reached."]
    missing = [name for name in config.variants if name not in rows]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["queue", "report"])
    parser.add_argument("--config", default="configs/ablation.yaml")
    parser.add_argument("--out", default="reports", help="report: the directory ablation.md goes to")
    arguments = parser.parse_args()
    config = load_config(Path(arguments.config))
    if arguments.command == "queue":
        for command in queue_commands(config):
            print(" ".join(command), flush=True)
            subprocess.run([sys.executable, "-m", *command], check=True)  # DVC of this interpreter's environment
        print("queued; run them with `dvc queue start -j 1`, then `python -m pipeline.ablation report`")
        return
    from pipeline.io import atomic_write_text

    root = Path(".")
    baseline, found = experiments(root)
    names = list(config.variants)
    rows = {names[0]: variant_row(root, baseline, config)}
    rows |= {names[index]: variant_row(root, commit, config) for index, commit in sorted(found.items()) if index < len(names)}
    out = Path(arguments.out) / "ablation.md"
    atomic_write_text(out, ablation_markdown(rows, config, baseline, arguments.config))
    print(f"wrote {out}: {len(rows)} of {len(names)} variants")


if __name__ == "__main__":
    exit_on_user_error(main)
