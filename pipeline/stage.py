"""What every training stage does around its recipe, in one place: the data-parallel relaunch, seeding, the resume
fingerprint, the MLflow run, the checkpointer, and, once the recipe returned, finishing the checkpoints and tearing
down torch.distributed.

    with training_stage("init_student@180K-1", params, seed, tags) as stage:
        result = train_sft(..., dist=stage.dist, log_metrics=stage.run.log_metrics, checkpointer=stage.checkpointer)

The fingerprint that decides whether a checkpoint in scratch/ may be resumed is the stage's own declaration in
dvc.yaml (pipeline/dvc_stages.py): its cmd, its params and the hashes of its deps, code included. A change to any of
them starts the stage afresh, exactly as it makes `dvc repro` rerun it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import checkpoint, engine
from pipeline.config import ConfigError, Params
from pipeline.dvc_stages import declaration
from pipeline.tracking import StageRun


@dataclass
class TrainingStage:
    dist: engine.Dist
    run: StageRun
    checkpointer: checkpoint.Checkpointer


@contextlib.contextmanager
def training_stage(name: str, params: Params, seed: int, tags: dict[str, str]) -> Iterator[TrainingStage]:
    """Enter stage `name` (its dvc.yaml name, matrix item included) seeded with `seed`; `tags` go on its MLflow run,
    plus `resumed_from` when it resumes a killed run's checkpoint."""
    engine.relaunch_if_data_parallel(params.engine)
    dist = engine.setup(params.engine)
    engine.seed_everything(seed)
    declared = declaration(name)
    fingerprint = checkpoint.fingerprint(declared.params | {"cmd": declared.cmd}, declared.deps)
    resume = checkpoint.find(name, fingerprint, dist)
    if resume is not None and resume.run_id:
        tags = tags | {"resumed_from": resume.run_id}
    with StageRun(name, declared.params, tags=tags, enabled=dist.is_main) as run:
        checkpointer = checkpoint.Checkpointer(name, fingerprint, params.checkpoint, dist, resume, run.run_id)
        yield TrainingStage(dist, run, checkpointer)
        # Only a recipe that returned gets here: after an exception the checkpoints stay for the next run to resume.
        checkpointer.finish()
    engine.teardown()


def add_distill_arguments(parser, methods: list[str]) -> None:
    """The command line of the distillation stages: which run, and the paths dvc.yaml passes."""
    from pipeline.sft import add_sft_input_arguments

    parser.add_argument("--method", choices=methods, required=True)
    parser.add_argument("--student", required=True, help="a label of models.students")
    parser.add_argument("--seed", type=int, required=True, help="the training seed, one of train_seeds")
    add_sft_input_arguments(parser)
    parser.add_argument("--teacher", required=True, help="the SFT teacher")
    parser.add_argument("--start", required=True, help="the student checkpoint training starts from")
    parser.add_argument("--out", required=True, help="the directory to write: model/ (and rollouts/ for MiniLLM and OPD)")
    parser.add_argument("--metrics", required=True, help="the metrics file to write (.json)")
    parser.add_argument("--plots", required=True, help="the directory of the training curves to write")


def student_params(arguments, params: Params) -> Params:
    """The params as the stages of --student read them (its models.students overrides applied), once --student and
    --seed are checked."""
    if arguments.student not in params.models.students:
        raise ConfigError(f"--student {arguments.student}: not a label of models.students")
    if arguments.seed not in params.train_seeds:
        raise ConfigError(f"--seed {arguments.seed}: not one of train_seeds {params.train_seeds}")
    return params.for_student(arguments.student)
