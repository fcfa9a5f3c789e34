"""Wall time of the whole `dvc repro` of the embedded default, per stage, process start-up included.

Copies the repository's tracked files into a temporary directory (a fresh git repo there, so DVC runs as in a
clone), runs `dvc repro` on the committed params.yaml, and timestamps each "Running stage" line as DVC prints it:
a stage's time runs from its line to the next one (the last stage's to the end of `dvc repro`). Writes the table to
benchmarks/results/pipeline_timing.md and prints it. Target (issue 5): the whole pipeline within 10 minutes on a
2-core CPU.

    .venv/bin/python -m benchmarks.bench_pipeline            # ~9 min on 2 cores
    .venv/bin/python -m benchmarks.bench_pipeline --here     # in this checkout: also regenerates its outputs
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 600


def copy_repository(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = REPO / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run([*git, "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=destination, check=True)


def timed_repro(workdir: Path, env: dict) -> tuple[list[tuple[str, float]], float]:
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro", "--force"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter() - started))
            print(f"[{marks[-1][1]:7.1f} s] {marks[-1][0]}", flush=True)
    if process.wait() != 0:
        raise SystemExit(f"dvc repro failed with status {process.returncode}")
    return marks, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline_timing.md"))
    parser.add_argument("--here", action="store_true", help="run in this checkout (and its MLflow store)")
    args = parser.parse_args()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if args.here:
        marks, total = timed_repro(REPO, env)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            workdir = Path(tmp)
            copy_repository(workdir)
            marks, total = timed_repro(workdir, env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"})
    ends = [start for _, start in marks[1:]] + [total]
    rows = [(stage, end - start) for (stage, start), end in zip(marks, ends)]
    lines = [
        f"# `dvc repro --force` of the embedded default: {total:.0f} s ({total / 60:.1f} min), "
        f"target {TARGET_S / 60:.0f} min: {'met' if total <= TARGET_S else 'missed'}",
        "",
        f"Measured on {os.cpu_count()} CPU cores by `python -m benchmarks.bench_pipeline`; process start-up included.",
        "",
        "| stage | wall time (s) | share |",
        "|---|---|---|",
        *[f"| {stage} | {seconds:.1f} | {seconds / total:.0%} |" for stage, seconds in rows],
        f"| **total** | **{total:.1f}** | |",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
