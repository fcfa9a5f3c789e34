"""Bad input and a hostile disk: one line naming the key, file or line, exit status 2, nothing half-written.

Through the real entry points where it is cheap: `exit_on_user_error(build_data.main)` in-process (the same code
as `python -m stages.build_data` without the interpreter start-up), and real subprocesses for the read-only
directory and the full disk.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import data, io
from pipeline.config import Architecture, ConfigError, exit_on_user_error
from pipeline.models import build_causal_lm, load_model, load_tokenizer, save_checkpoint, save_pointer
from stages import build_data
from tests.test_config import REPO
from tests.workspace import DVC_PROJECT_FILES, dvc_project, stage_command

GOOD = {"instruction": "Name a city.", "context": "", "response": "Paris is one.", "category": "open_qa"}


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = data.train_bpe_tokenizer(["Name a city. Paris is one."] * 20, vocab_size=300)
    model = build_causal_lm(Architecture(n_layer=1, n_embd=8, n_head=2), len(tokenizer), 32, tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("ckpt") / "sft"
    save_checkpoint(model, tokenizer, path)
    return path


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def test_checkpoint_manifest_lists_every_file(checkpoint):
    manifest = json.loads((checkpoint / io.CHECKSUM_FILE).read_text())
    on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != io.CHECKSUM_FILE)
    assert sorted(manifest) == on_disk and "model.safetensors" in manifest
    assert manifest["model.safetensors"]["size"] == (checkpoint / "model.safetensors").stat().st_size
    assert load_model(checkpoint).config.n_embd == 8


def test_truncated_or_flipped_checkpoint_is_refused(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match=rf"^{weights}: corrupted: {len(good) // 2} bytes, {len(good)} when written$"):
        load_model(path)
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # inside the tensor data: safetensors itself would load it without complaint
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=rf"^{weights}: corrupted: sha256 differs"):
        load_model(path)
    weights.write_bytes(good)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer.json: missing \(listed in its checksum manifest\)"):
        load_tokenizer(path)


def test_missing_checkpoint_and_unloadable_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^models/teacher/sft: checkpoint directory not found$"):
        load_model("models/teacher/sft")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/gone: checkpoint directory not found$"):
        load_tokenizer(tmp_path / "gone")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^cannot load model 'no-org/no-model': "):
        load_model("no-org/no-model")
    assert time.monotonic() - started < 5  # no retries against an unreachable Hub


def test_corrupted_pointer_is_refused(tmp_path):
    save_pointer("gpt2", tmp_path / "base")
    (tmp_path / "base" / "pretrained.json").write_text('{"name_or_path": "gpt3"}\n')
    with pytest.raises(ConfigError, match=r"pretrained.json: corrupted"):
        load_model(tmp_path / "base")


# ---------------------------------------------------------------------------------------------- a full disk


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write()/fsync() raise it: no file name


def test_full_disk_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    io.atomic_write_json(target, {"loss": 1.0})
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as raised:
        io.atomic_write_json(target, {"loss": 2.0})
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert json.loads(target.read_text()) == {"loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_full_disk_inside_a_directory_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous good output")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as raised:
        with io.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 100)
            io.atomic_write_text(tmp / "b.txt", "half")
    assert raised.value.filename == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_disk_errors_become_one_line_and_exit_2(code, capsys):
    def main():
        raise OSError(code, os.strerror(code), "/data/out/model")

    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(main)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: /data/out/model: {os.strerror(code)}\n"


def test_other_os_errors_are_bugs_and_keep_their_traceback():
    def main():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        exit_on_user_error(main)


# ------------------------------------------------------------------------------- build_data on bad input


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def write_params(directory: Path, **data_keys) -> None:
    params = yaml.safe_load((REPO / "tests" / "micro_params.yaml").read_text())
    params["data"].update(source="jsonl", jsonl_path=str(directory / "dolly.jsonl"), valid_size=2, test_size=2,
                          tokenizer_vocab_size=300, **data_keys)
    params["data"]["pretrain"]["n_documents"] = 20
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


def run_build_data_in_process(tmp_path, monkeypatch, capsys, store_uri, jsonl: bytes, **data_keys):
    (tmp_path / "dolly.jsonl").write_bytes(jsonl)
    write_params(tmp_path, **data_keys)
    dvc_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.setattr(sys, "argv", stage_command("build_data", tmp_path)[2:])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(build_data.main)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exited.value.code, lines


def lines_of(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize(
    ("jsonl", "data_keys", "expected"),
    [
        (lines_of([GOOD] * 3) + b'{"instruction": "caf\xe9"}\n', {}, "dolly.jsonl:4: not valid UTF-8 (invalid continuation byte)"),
        (lines_of([GOOD] * 8) + json.dumps(GOOD).encode()[:20], {},
         "dolly.jsonl:9: not valid JSON (Unterminated string starting at); the file looks truncated"),
        (lines_of([GOOD] * 5) + b"\n" + lines_of([{k: v for k, v in GOOD.items() if k != "category"}]), {},
         "dolly.jsonl:7: missing field 'category'"),
        (b"", {}, "dolly.jsonl: no records (the file is empty)"),
        (lines_of([GOOD] * 8), {"max_prompt_length": 8}, "train split: every prompt is over data.max_prompt_length (8)"),
    ],
    ids=["not-utf8", "truncated", "missing-field", "empty-file", "all-prompts-too-long"],
)
def test_build_data_rejects_bad_data_in_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys, store_uri, jsonl, data_keys, expected
):
    code, lines = run_build_data_in_process(tmp_path, monkeypatch, capsys, store_uri, jsonl, **data_keys)
    assert code == 2
    assert lines[-1].startswith("error: ") and lines[-1].endswith(expected), lines
    assert not (tmp_path / "data").exists()
    # No temporary directory is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dolly.jsonl", "params.yaml", *DVC_PROJECT_FILES])


def stage_subprocess_env(directory: Path, store_uri: str) -> dict:
    """The store and HOME (where libraries write caches) live outside the directory under test."""
    (directory.parent / "home").mkdir(exist_ok=True)
    return {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(directory.parent / "home"),
            "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_TRACKING_URI": store_uri}


def test_build_data_into_a_read_only_directory(tmp_path, store_uri):
    work = tmp_path / "work"
    work.mkdir()
    (work / "dolly.jsonl").write_bytes(lines_of([GOOD] * 8))
    write_params(work)
    dvc_project(work)
    command = stage_command("build_data", work)
    if os.geteuid() == 0:  # root writes through permissions; without CAP_DAC_OVERRIDE it is bound by them
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    env = stage_subprocess_env(work, store_uri)
    os.chmod(work, 0o555)
    try:
        completed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(work, 0o755)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == "error: data: Permission denied"
    assert "Traceback" not in completed.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted(["dolly.jsonl", "params.yaml", *DVC_PROJECT_FILES])


def test_build_data_on_a_full_disk(tmp_path, store_uri):
    """The disk fills up at the first fsync of the output: one line, and no data/ nor temporary directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "dolly.jsonl").write_bytes(lines_of([GOOD] * 8))
    write_params(work)
    dvc_project(work)
    fill_disk_then_run = (
        "import errno, os, runpy, sys\n"
        "def full(fd):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.fsync = full\n"
        f"sys.argv = {stage_command('build_data', work)[2:]!r}\n"
        "runpy.run_module('stages.build_data', run_name='__main__')\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", fill_disk_then_run], cwd=work, env=stage_subprocess_env(work, store_uri),
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == f"error: data: {os.strerror(errno.ENOSPC)}"
    assert "Traceback" not in completed.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted(["dolly.jsonl", "params.yaml", *DVC_PROJECT_FILES])
