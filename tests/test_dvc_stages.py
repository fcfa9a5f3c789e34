"""pipeline/dvc_stages.py on a small DVC project in a temporary directory: the current stages as DVC expands the
matrix over params, and the removal of a removed stage's outputs and dvc.lock entry (issue 15: stale results)."""

import subprocess
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from pipeline.dvc_stages import current_outputs, current_stages, prune_removed_stages

PIPELINE = """
stages:
  shared:
    cmd: "true"
    outs: [data]
  train:
    matrix: {student: "${students}", seed: "${train_seeds}"}
    cmd: "true"
    outs: ["models/${item.student}/seed${item.seed}"]
    metrics: [{"metrics/eval/${item.student}-seed${item.seed}.json": {cache: false}}]
"""


def lock_entry(*paths: str) -> dict:
    return {"cmd": "true", "outs": [{"path": path, "md5": "0" * 32, "size": 1} for path in paths]}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    Repo.init().close()
    (tmp_path / "dvc.yaml").write_text(PIPELINE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"students": ["a"], "train_seeds": [1]}))
    return tmp_path


def write_outputs(*paths: str) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("x")


def test_current_stages_expand_the_matrix_over_the_params(project: Path):
    assert current_stages() == {"shared": ["data"], "train@a-1": ["models/a/seed1", "metrics/eval/a-seed1.json"]}
    (project / "params.yaml").write_text(yaml.safe_dump({"students": ["a", "b"], "train_seeds": [1, 2]}))
    assert current_outputs("metrics/eval") == [Path(f"metrics/eval/{s}-seed{k}.json") for s in "ab" for k in (1, 2)]
    assert current_outputs("metrics") == current_outputs("metrics/eval")
    assert current_outputs("metrics/ev") == []  # a directory, not a string prefix


def test_a_removed_stage_loses_its_outputs_and_lock_entry(project: Path, capsys: pytest.CaptureFixture):
    """The run that wrote the lock had students a and b and seeds 1 and 2; now only a with seed 1 is left."""
    everything = ["data/x", "models/a/seed1/w", "metrics/eval/a-seed1.json"]
    stale = ["models/a/seed2/w", "metrics/eval/a-seed2.json", "models/b/seed1/w", "metrics/eval/b-seed1.json"]
    write_outputs(*everything, *stale)
    # DVC's own .gitignore lines for the cached outputs, as `dvc repro` writes them.
    Path("models/a/.gitignore").write_text("/seed1\n/seed2\n")
    Path("models/b/.gitignore").write_text("/seed1\n")
    lock = {"schema": "2.0", "stages": {
        "shared": lock_entry("data"),
        "train@a-1": lock_entry("models/a/seed1", "metrics/eval/a-seed1.json"),
        "train@a-2": lock_entry("models/a/seed2", "metrics/eval/a-seed2.json"),
        "train@b-1": lock_entry("models/b/seed1", "metrics/eval/b-seed1.json"),
        # A renamed stage whose output a current stage now writes: the entry goes, the output stays.
        "old_shared": lock_entry("data", "gone/never-written.txt"),
    }}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))

    assert prune_removed_stages("dvc.lock") == ["train@a-2", "train@b-1", "old_shared"]
    after = yaml.safe_load((project / "dvc.lock").read_text())
    assert after == {"schema": "2.0", "stages": {"shared": lock["stages"]["shared"], "train@a-1": lock["stages"]["train@a-1"]}}
    assert all(Path(path).exists() for path in everything)
    assert not any(Path(path).exists() for path in stale)
    assert not Path("models/b").exists(), "a folder emptied by the removal goes too"
    assert Path("models/a").is_dir() and Path("metrics/eval").is_dir()
    assert Path("models/a/.gitignore").read_text() == "/seed1\n"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith("removed stage train@a-2: no longer in dvc.yaml")

    before = (project / "dvc.lock").read_text()
    assert prune_removed_stages("dvc.lock") == []  # nothing left to remove: the lock is not rewritten
    assert (project / "dvc.lock").read_text() == before


def test_no_lock_yet_is_nothing_to_prune(project: Path):
    assert prune_removed_stages("dvc.lock") == []
    assert not (project / "dvc.lock").exists()


def test_declaration_of_a_matrix_stage_from_any_directory_and_of_a_missing_one(project: Path, monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.dvc_stages import declaration

    (project / "params.yaml").write_text(yaml.safe_dump({"students": ["a", "b"], "train_seeds": [1, 2]}))
    monkeypatch.chdir(project.parent)  # the tests read stages of a project elsewhere
    found = declaration("train@b-2", project)
    assert (found.cmd, found.outs) == ("true", ("models/b/seed2", "metrics/eval/b-seed2.json"))
    with pytest.raises(ConfigError, match=r"^dvc.yaml: no stage train@c-1 with the current params.yaml$"):
        declaration("train@c-1", project)


STUDENT_STAGES = ("init_student", "distill_sft_long", "distill_kd", "distill_seqkd", "distill_minillm", "distill_gkd",
                  "distill_distillm", "distill_opd")


def test_a_students_overrides_reach_its_stages_and_no_others(tmp_path: Path, monkeypatch):
    """Two students, one with spec §2's own SFT rate: the project's dvc.yaml declares each student's entry in its
    own training stages only, so DVC reruns just those when it changes; the stages read it through for_student."""
    from argparse import Namespace

    from pipeline.config import Params
    from pipeline.dvc_stages import declaration
    from pipeline.stage import student_params
    from tests.test_config import REPO

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    Repo.init().close()
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    small = params["models"]["students"]["180K"]
    params["models"]["students"] = {"small": small, "large": small | {"overrides": {
        "init_student": {"optimizer": {"lr": 1.0e-4}}, "distill": {"minillm": {"batch_size": 32}}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seed = params["train_seeds"][0]
    for stage in STUDENT_STAGES:
        large = declaration(f"{stage}@large-{seed}", tmp_path).params
        small_declared = declaration(f"{stage}@small-{seed}", tmp_path).params
        assert large["models.students.large"]["overrides"]["init_student"] == {"optimizer": {"lr": 1.0e-4}}, stage
        assert "models.students.small" not in large and "models.students.large" not in small_declared, stage
    for stage in ("pretrain_teacher", "train_teacher", "teacher_generate", f"evaluate@minillm-large-{seed}"):
        assert not any(key.startswith("models.students.") for key in declaration(stage, tmp_path).params), stage
    loaded = Params.model_validate(params)
    large_view = student_params(Namespace(student="large", seed=seed), loaded)
    small_view = student_params(Namespace(student="small", seed=seed), loaded)
    assert (large_view.init_student.optimizer.lr, small_view.init_student.optimizer.lr) == (1.0e-4, loaded.init_student.optimizer.lr)
    assert (large_view.distill.minillm.batch_size, small_view.distill.minillm.batch_size) == (32, loaded.distill.minillm.batch_size)
    assert large_view.distill.minillm.optimizer == loaded.distill.minillm.optimizer  # only the keys it lists change
