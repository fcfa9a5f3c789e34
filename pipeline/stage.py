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
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoint, engine
from pipeline.config import ConfigError, Params
from pipeline.cost import BudgetCheckpoint, training_flops
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
    parser.add_argument("--out", required=True, help="the directory to write: model/, model_at_budget/ (and rollouts/ "
                        "for MiniLLM and OPD)")
    add_budget_arguments(parser)
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


def add_budget_arguments(parser) -> None:
    """What the compute-matched checkpoint (pipeline/cost.py) needs beyond the recipe's own counts."""
    parser.add_argument("--start-metrics", help="the metrics file of the stage --start comes from (the SFT init), "
                        "whose FLOPs count toward the budget; absent for a start that is the pre-trained student")
    parser.add_argument("--generate-metrics", help="teacher_generate's metrics file, for SeqKD: the teacher's "
                        "generation of the training data counts toward the budget")


def budget_checkpoint(arguments, params: Params, student, teacher=None) -> BudgetCheckpoint:
    """The run's BudgetCheckpoint: `compute_budget_flops`, with the FLOPs spent before its first step."""
    from pipeline.models import count_parameters

    teacher_parameters = count_parameters(teacher) if teacher is not None else 0
    start_flops = 0.0
    if arguments.start_metrics:
        start = read_metrics(arguments.start_metrics, ("parameters", "response_tokens_trained", "generated_tokens",
                                                        "teacher_forward_tokens"))
        start_flops += training_flops(start["parameters"], start["response_tokens_trained"], start["generated_tokens"],
                                      teacher_parameters, start["teacher_forward_tokens"])
    if arguments.generate_metrics:
        generated = read_metrics(arguments.generate_metrics, ("generated_tokens",))["generated_tokens"]
        start_flops += training_flops(teacher_parameters, 0, generated)
    return BudgetCheckpoint(budget_flops=params.compute_budget_flops, start_flops=start_flops,
                            student_parameters=count_parameters(student), teacher_parameters=teacher_parameters)


def save_at_budget(budget: BudgetCheckpoint, table1_model, start: str, tokenizer, directory) -> None:
    """model_at_budget/: Table 1's model for a run that ended within the budget, else the best validated within
    it, or the start when nothing was validated within it."""
    from pipeline.models import load_model, save_checkpoint
    from pipeline.sft import copy_with_state

    if budget.exceeded_at_step is None:
        model = table1_model
    elif budget.state:
        model = copy_with_state(table1_model, budget.state)
    else:
        model = load_model(start, next(table1_model.parameters()).dtype)
    save_checkpoint(model, tokenizer, directory)


def read_metrics(path: str, keys: tuple[str, ...]) -> dict:
    """A stage's metrics file, with a one-line error naming the file or the missing key."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the metrics file ({error})") from error
    missing = [key for key in keys if key not in metrics]
    if missing:
        raise ConfigError(f"{path}: no {missing[0]!r}; rerun the stage that writes it (dvc repro)")
    return metrics
