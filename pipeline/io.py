"""Atomic writes: every artifact appears whole or not at all, so DVC never caches a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.config import ConfigError

CHECKSUM_FILE = "checksums.json"  # in a checkpoint directory: {relative path: {"sha256", "size"}}
CHECKSUM_SUFFIX = ".checksum.json"  # beside a single file: {"sha256", "size"}


def atomic_write_bytes(path: str | Path, content: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise _naming_target(error, path, inside=None)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as error:
        raise _naming_target(error, path, inside=None)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming_target(error, path, inside=tmp)


def _naming_target(error: BaseException, path: Path, inside: Path | None) -> BaseException:
    """The user's error line must name the artifact being written, not a temporary name (or none at all: a
    failed write() on a full disk carries no file name). With `inside`, only errors on files under that
    temporary directory are renamed; others (say, an unreadable input) keep their own file name."""
    if not isinstance(error, OSError) or error.errno is None:
        return error
    if inside is not None and error.filename is not None and not str(error.filename).startswith(str(inside)):
        return error
    return OSError(error.errno, os.strerror(error.errno), str(path))


# -------------------------------------------------------------------------- checksums of written artifacts
# A truncated copy, a bad disk block or a partial rsync must fail on load with the file's name, not as garbage
# weights or a numpy error deep in training.


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_file_checksum(path: str | Path) -> None:
    path = Path(path)
    atomic_write_json(f"{path}{CHECKSUM_SUFFIX}", {"sha256": sha256_of(path), "size": path.stat().st_size})


def verify_file_checksum(path: str | Path) -> None:
    """The file must match the checksum file written beside it; raises ConfigError naming the file."""
    path = Path(path)
    checksum_path = Path(f"{path}{CHECKSUM_SUFFIX}")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    if not checksum_path.is_file():
        raise ConfigError(f"{path}: no checksum file {checksum_path.name} beside it; rebuild it (dvc repro)")
    _verify_against(path, _read_checksum(checksum_path, checksum_path))


def write_checksums(directory: str | Path) -> None:
    """Record the size and sha256 of every file under `directory` in its CHECKSUM_FILE."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    manifest = {str(p.relative_to(directory)): {"sha256": sha256_of(p), "size": p.stat().st_size} for p in files}
    atomic_write_json(directory / CHECKSUM_FILE, manifest)


def verify_checksums(directory: str | Path) -> None:
    """Check the files a directory's CHECKSUM_FILE lists. A directory without one was not written by this
    pipeline (a pretrained model's own directory) and is not checked."""
    directory = Path(directory)
    manifest_path = directory / CHECKSUM_FILE
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"{manifest_path}: unreadable checksum manifest") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{manifest_path}: unreadable checksum manifest")
    for name, expected in manifest.items():
        _verify_against(directory / name, _checked_entry(expected, manifest_path))


def _read_checksum(checksum_path: Path, source: Path) -> dict:
    try:
        expected = json.loads(checksum_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"{source}: unreadable checksum file") from None
    return _checked_entry(expected, source)


def _checked_entry(expected, source: Path) -> dict:
    if not (isinstance(expected, dict) and isinstance(expected.get("sha256"), str) and type(expected.get("size")) is int):
        raise ConfigError(f"{source}: unreadable checksum file")
    return expected


def _verify_against(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: missing (listed in its checksum manifest)")
    size = path.stat().st_size
    if size != expected["size"]:
        raise ConfigError(f"{path}: corrupted: {size} bytes, {expected['size']} when written")
    if sha256_of(path) != expected["sha256"]:
        raise ConfigError(f"{path}: corrupted: sha256 differs from the one recorded when it was written")
