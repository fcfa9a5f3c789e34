"""params.yaml validation: every mistake is one line naming the key, exit status 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.max_prompt_length < params.data.max_length


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["data"].update(max_lenght=10), r"data\.max_lenght: unknown key"),
        (lambda p: p.update(evaluatee={}), r"evaluatee: unknown key"),
        (lambda p: p["train_teacher"]["optimizer"].update(lr="fast"), r"train_teacher\.optimizer\.lr: .*number"),
        (lambda p: p["init_student"]["optimizer"].update(lr=-1.0), r"init_student\.optimizer\.lr: .*greater than 0"),
        (lambda p: p["data"].update(max_prompt_length=500), r"data: max_prompt_length \(500\) must be below max_length"),
        (lambda p: p["evaluate"].update(seeds=[]), r"evaluate\.seeds: .*at least 1"),
        (lambda p: p["data"].update(source="web"), r"data\.source: .*'synthetic'"),
        (lambda p: p["models"]["students"]["180K"].update(name_or_path="gpt2"), r"models\.students\.180K: give exactly one"),
        (lambda p: p["models"]["students"].update({"1.5M": p["models"]["students"]["180K"]}), r"models\.students\.1\.5M\.\[key\]: String should match"),
        (lambda p: p["models"].update(students={}), r"models\.students: .*at least 1"),
        (lambda p: p["models"]["teacher"]["arch"].update(n_head=3), r"models\.teacher\.arch: n_embd .* divisible"),
        (lambda p: p["evaluate"].update(max_new_tokens=4096), r"evaluate\.max_new_tokens \(4096\) exceeds"),
        (lambda p: p["engine"].update(precision="bf16"), r"engine: the CPU path trains in fp32"),
        (lambda p: p.pop("seed"), r"seed: required key is missing"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, edit))


def test_stage_prints_one_line_and_exits_2(tmp_path):
    write_params(tmp_path, lambda p: p["data"].update(max_lenght=10))
    completed = subprocess.run(
        [sys.executable, "-m", "stages.check_params"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: params.yaml: data.max_lenght: unknown key"
    assert not (tmp_path / "checks").exists()


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
