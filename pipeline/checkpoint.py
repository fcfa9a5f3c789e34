"""Resumable training: periodic checkpoints in `scratch/<stage>/`, a git-ignored directory that no dvc.yaml stage
declares, so DVC never removes it and a rerun after a kill finds it. (A declared uncached out would be missing in
every fresh workspace, a clone or a queued experiment's temporary copy, and DVC would then retrain the stage.)

    scratch/<stage>/
        step_000120/          the latest complete checkpoint; the previous one is deleted only once this one is whole
            meta.json         fingerprint, step, MLflow run id
            deepspeed/state/  engine.save_checkpoint: model, optimizer (ZeRO shards per rank), LR schedule,
                              DeepSpeed's step counters, and the recipe's loop state as client_state
            rank<r>.pt        this rank's state: RNGs (python, numpy, torch, CUDA, the recipe's own generators) and
                              what differs between ranks (MiniLLM's rollout buffer)
        .step_000160.tmp/     a checkpoint being written; a kill leaves it behind, the next start removes it
        done.json             written on success, when the bulky state is deleted: only the fingerprint

The fingerprint hashes the stage's params, the content of its inputs (start checkpoint, data) and the code
that trains: a checkpoint written under anything else is discarded rather than resumed.
`checkpoint.every_steps` is not part of it: when checkpoints are taken never changes the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import engine
from pipeline.config import CheckpointConfig, ConfigError

SCRATCH = Path("scratch")
# The code a training stage runs; any edit to it makes a scratch checkpoint stale.
class NonFiniteLoss(ConfigError):
    """A NaN or inf loss part or gradient norm; like a ConfigError it ends the stage with one line (exit 2):
    the fix is the user's (a lower learning rate, tighter clipping), and the last good checkpoint is kept."""


def first_nonfinite(parts: dict[str, float]) -> str | None:
    """The name of the first NaN or inf among a step's global loss parts and gradient norm."""
    return next((name for name, value in parts.items() if not math.isfinite(value)), None)


def skip_or_stop(stage_key: str, step: int, part: str, skipped: int, max_skips: int) -> int:
    """A non-finite step was not applied (engine.FiniteStepAdamW); stop, or count it as skipped while the
    `checkpoint.max_nonfinite_skips` budget lasts. Stopping raises before the next checkpoint, so the last one
    on disk is the last good state."""
    if skipped >= max_skips:
        raise NonFiniteLoss(
            f"{stage_key}: non-finite {part} at step {step}; stopped, the last good checkpoint stays in scratch/ "
            f"(checkpoint.max_nonfinite_skips: {max_skips})"
        )
    print(f"{stage_key}: non-finite {part} at step {step}, step skipped ({skipped + 1} of {max_skips} allowed)")
    return skipped + 1


def fingerprint(params: dict, inputs: list[str | Path] | tuple[str | Path, ...]) -> str:
    """sha256 over the params (canonical JSON) and every file under `inputs`, by content. Stages pass their
    declaration (pipeline/dvc_stages.py): the declared params, and the declared deps, which include every module the
    stage can import, so a checkpoint made by other code or data is never resumed."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for root in inputs:
        root = Path(root)
        if not root.exists():
            raise ConfigError(f"{root}: input not found; run the stages that make it first (dvc repro)")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path).encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Resume:
    directory: Path
    step: int
    run_id: str | None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def find(stage: str, stage_fingerprint: str, dist: engine.Dist) -> Resume | None:
    """The latest complete checkpoint in scratch/<stage>/ if it has this fingerprint; a stale one is discarded
    with one line. Called before the MLflow run opens, so a resumed run can be tagged with the interrupted one."""
    directory = SCRATCH / stage
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "done.json").unlink(missing_ok=True)
        for partial in directory.glob(".step_*.tmp"):
            shutil.rmtree(partial)
    engine.barrier()
    complete = sorted(directory.glob("step_*"))
    if complete:
        meta = json.loads((complete[-1] / "meta.json").read_text())
        if meta["fingerprint"] == stage_fingerprint:
            return Resume(directory=complete[-1], step=meta["step"], run_id=meta["run_id"])
        if dist.is_main:
            print(f"{directory}: the checkpoint of step {meta['step']} was written with other params, inputs or code; "
                  "discarded, starting fresh")
    engine.barrier()  # every rank has looked before the main rank clears it
    if dist.is_main:
        # A fresh start keeps nothing of an earlier attempt (MiniLLM's saved rounds among it).
        shutil.rmtree(directory)
        directory.mkdir(parents=True)
    engine.barrier()
    return None


class Checkpointer:
    """One stage's checkpoints: what a recipe needs to resume (`resume`), save every `every_steps` steps, and
    the non-finite policy. Every rank calls every method (they synchronise)."""

    def __init__(self, stage: str, stage_fingerprint: str, config: CheckpointConfig, dist: engine.Dist,
                 resume: Resume | None, run_id: str | None):
        self.directory = SCRATCH / stage
        self.fingerprint = stage_fingerprint
        self.every_steps = config.every_steps
        self.max_nonfinite_skips = config.max_nonfinite_skips
        self.dist = dist
        self.resume = resume
        self.run_id = run_id

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, model_engine, step: int, loop_state: dict, rank_state: dict) -> None:
        """Write step_<step>/ through a temporary directory renamed into place, then drop the older ones."""
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".step_{step:06d}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        model_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", client_state=loop_state, save_latest=False)
        torch.save({"process_rng": rng_state()} | rank_state, tmp / f"rank{self.dist.rank}.pt")
        engine.barrier()
        if self.dist.is_main:
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": self.fingerprint, "step": step, "run_id": self.run_id}))
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_directory(self.directory)
            for older in self.directory.glob("step_*"):
                if older != final:
                    shutil.rmtree(older)
        engine.barrier()

    def load(self, model_engine) -> tuple[dict, dict]:
        """Restore model, optimizer and schedule into `model_engine` and the process RNGs from `resume`; returns
        the loop state (the same on every rank) and this rank's own state."""
        _, loop_state = model_engine.load_checkpoint(str(self.resume.directory / "deepspeed"), tag="state")
        rank_state = torch.load(self.resume.directory / f"rank{self.dist.rank}.pt", weights_only=False)
        set_rng_state(rank_state["process_rng"])
        if self.dist.is_main:
            print(f"{self.directory.name}: resuming from step {self.resume.step}")
        return loop_state, rank_state

    def finish(self) -> None:
        """The stage succeeded and its outputs are written: drop the bulky state, leave the small deterministic
        marker DVC hashes."""
        engine.barrier()
        if self.dist.is_main:
            shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            (self.directory / "done.json").write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")


def _fsync_tree(root: Path) -> None:
    """Data reaches the disk before the rename publishes it: a power cut never leaves a named, empty checkpoint."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(root)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
