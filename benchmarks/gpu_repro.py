"""A short real `dvc repro` of a GPT-2-shaped config on one GPU (the GPU check, benchmarks/gpu_check.sh).

configs/paper-gpt2.yaml with configs/paper-gpt2-dryrun.yaml's steps, batches and data merged over it, one student
(120M: gpt2's shape, 12 x 768 x 12, built from scratch by pretrain_student) and a random gpt2-medium-shaped teacher
(24 x 1024 x 16) with GPT-2's 50,257-token layout; engine on one CUDA device in bf16 (teacher bf16 too), one
process, ZeRO stage 1 as the paper config has it. Every stage runs for a couple of steps: data, teacher SFT and
generation, student pre-training and SFT, the seven methods, evaluation over two seeds, the compute-matched
evaluations and the report. It proves the GPU code path (NCCL init, bf16 DeepSpeed engines, the CUDA samplers, the
fused heads in bf16) end to end; the numbers in its report mean nothing (random models, seven training records).

Prints each stage's wall time (DVC's own 'Running stage' lines, timestamped here) and the total.

    python -m benchmarks.gpu_repro --workdir /tmp/gpu-repro
    python -m benchmarks.gpu_repro --workdir /tmp/gpu-repro-cpu --device cpu --precision fp32 --tiny   # driver check
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import deep_merge
from pipeline.data import build_prompt
from tests.test_paper_dryrun import (
    DRYRUN_OVERLAY,
    GPT2_MEDIUM,
    PAPER_CONFIG,
    dryrun_texts,
    finite_numbers,
    gpt2_layout_tokenizer,
    save_random_gpt2,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
# What a stage reads from the repository: the code and the DVC project (the device copy of the tree has no .git,
# so tests.workspace.copy_sources, which asks git for the file list, cannot run there).
SOURCES = ("pipeline", "stages", "dvc.yaml", ".dvcignore")
TINY_TEACHER = {"n_layer": 2, "n_embd": 64, "n_head": 2}


def gpu_params(device: str, precision: str, tiny: bool) -> dict:
    params = deep_merge(yaml.safe_load(PAPER_CONFIG.read_text()), yaml.safe_load(DRYRUN_OVERLAY.read_text()))
    student_arch = {"n_layer": 2, "n_embd": 64, "n_head": 2} if tiny else {"n_layer": 12, "n_embd": 768, "n_head": 12}
    params["models"]["students"] = {"120M": {"name_or_path": None, "arch": student_arch,
                                             "overrides": {"distill": {"minillm": {"batch_size": 2}}}}}
    params["engine"] |= {"num_procs": 1, "device": device, "precision": precision, "teacher_precision": precision}
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a new directory for the repository copy")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--tiny", action="store_true", help="2 x 64 models: checks this driver on a CPU in minutes")
    args = parser.parse_args()

    workdir = args.workdir
    if workdir.exists():
        sys.exit(f"error: --workdir {workdir} exists; give a new directory")
    workdir.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, workdir / name)
    (workdir / "reports").mkdir()
    params = gpu_params(args.device, args.precision, args.tiny)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    records, documents = dryrun_texts()
    write_jsonl(workdir / params["data"]["jsonl_path"], records)
    write_jsonl(workdir / params["data"]["pretrain"]["path"], [{"text": d} for d in documents])
    tokenizer = gpt2_layout_tokenizer([build_prompt(r["instruction"], r["context"]) + r["response"] for r in records]
                                      + documents)
    save_random_gpt2(TINY_TEACHER if args.tiny else GPT2_MEDIUM, tokenizer,
                     workdir / params["models"]["teacher"]["name_or_path"], seed=0)

    # DVC's shell runs `python`: this interpreter, whatever the machine calls its own (a wrapper, not a symlink: a
    # linked venv interpreter would not find its pyvenv.cfg and would run without the venv's packages).
    bin_dir = workdir / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    for inherited in ("DVC_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=workdir, env=env, check=True)

    start = time.perf_counter()
    last_stage, last_time = None, start
    repro = subprocess.Popen([*dvc, "repro"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)
    log = []
    for line in repro.stdout:
        log.append(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if last_stage:
                print(f"{now - last_time:7.1f} s  {last_stage}", flush=True)
            last_stage, last_time = line.split("'")[1], now
    repro.wait()
    total = time.perf_counter() - start
    if last_stage:
        print(f"{total - (last_time - start):7.1f} s  {last_stage} (and DVC's closing work)")
    if repro.returncode != 0:
        print("".join(log[-60:]))
        sys.exit(f"dvc repro failed ({repro.returncode}) after {total:.0f} s")

    bad = [str(path.relative_to(workdir)) for path in sorted((workdir / "metrics").rglob("*.json"))
           if not finite_numbers(json.loads(path.read_text()))]
    stages = subprocess.run([*dvc, "stage", "list", "--name-only"], cwd=workdir, env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    print(f"dvc repro: {len(stages)} stages in {total:.0f} s on {args.device} ({args.precision}); "
          f"non-finite metrics: {bad or 'none'}")
    print((workdir / "reports" / "table1.md").read_text())
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
