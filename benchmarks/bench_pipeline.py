"""Wall time of the whole `dvc repro` of the embedded default, per stage, process start-up included.

Copies the repository's tracked files into a temporary directory (a fresh git repo there, so DVC runs as in a
clone), runs `dvc repro --force` on the committed params.yaml, and timestamps each "Running stage" line as DVC
prints it: a stage's time runs from its line to the next one (the last stage's to the end of `dvc repro`), DVC's own
hashing included. Its start-up is the time of `python -c "import stages.<its script>"` in the same checkout, run
after the repro (best of 3): the interpreter and every import the stage makes before it does any work.

Times are also given normalised, as the issues state their targets: seconds x GFLOP/s / 100, with the 2-thread
1024^2 fp32 matmul speed of this machine measured before and after the repro (the lower is used; machines of one
kind differ 2x from day to day). Target (issue 17): the whole pipeline within 600 normalised seconds.
Writes the table to benchmarks/results/pipeline_timing.md and prints it.

    .venv/bin/python -m benchmarks.bench_pipeline            # ~20-30 min on 2 cores
    .venv/bin/python -m benchmarks.bench_pipeline --here     # in this checkout: also regenerates its outputs
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_NORMALISED_S = 600


def matmul_gflops() -> float:
    """The yardstick of the issues' time targets: 2-thread 1024^2 fp32 matmul, best of 5 rounds of 10."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    a = torch.randn(1024, 1024)
    for _ in range(5):
        a @ a
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        best = max(best, 2 * 1024**3 * 10 / (time.perf_counter() - started) / 1e9)
    torch.set_num_threads(threads)
    return best


def start_up_seconds(workdir: Path, env: dict, module: str, repeats: int = 3) -> float:
    """Interpreter start and the stage script's imports, before any work: best of `repeats`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=workdir, env=env, check=True)
        times.append(time.perf_counter() - started)
    return min(times)


def stage_modules(workdir: Path) -> dict[str, str]:
    """Stage name -> the `stages.<x>` module its command runs, from the dvc.lock the repro wrote."""
    stages = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    return {name: re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1) for name, stage in stages.items()}


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
    gflops_before = matmul_gflops()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        workdir = REPO if args.here else Path(tmp)
        if not args.here:
            copy_repository(workdir)
            env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
        marks, total = timed_repro(workdir, env)
        modules = stage_modules(workdir)
        start_up = {module: start_up_seconds(workdir, env, module) for module in sorted(set(modules.values()))}
    gflops_after = matmul_gflops()
    gflops = min(gflops_before, gflops_after)
    ends = [start for _, start in marks[1:]] + [total]
    rows = [(stage, end - start, start_up[modules[stage]]) for (stage, start), end in zip(marks, ends)]
    total_start_up = sum(seconds for _, _, seconds in rows)
    normalised = total * gflops / 100
    lines = [
        f"# `dvc repro --force` of the embedded default: {total:.0f} s at {gflops:.0f} GFLOP/s = {normalised:.0f} "
        f"normalised s, target {TARGET_NORMALISED_S}: {'met' if normalised <= TARGET_NORMALISED_S else 'missed'}",
        "",
        f"Measured on {os.cpu_count()} CPU cores by `python -m benchmarks.bench_pipeline"
        f"{' --here' if args.here else ''}` ({time.strftime('%Y-%m-%d')}; matmul {gflops_before:.0f} GFLOP/s before the "
        f"repro and {gflops_after:.0f} after, the lower used). Wall time includes the stage's process start-up "
        "and DVC's bookkeeping; start-up is the interpreter and the stage script's imports, measured separately "
        f"(best of 3). Start-up in all: {total_start_up:.0f} s, {total_start_up / total:.0%} of the total.",
        "",
        "| stage | wall time (s) | normalised (s) | share of total | start-up (s) | start-up share of the stage |",
        "|---|---|---|---|---|---|",
        *[f"| {stage} | {seconds:.1f} | {seconds * gflops / 100:.0f} | {seconds / total:.0%} | {imports:.1f} | "
          f"{imports / seconds:.0%} |" for stage, seconds, imports in rows],
        f"| **total** | **{total:.1f}** | **{normalised:.0f}** | | **{total_start_up:.1f}** | "
        f"**{total_start_up / total:.0%}** |",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
