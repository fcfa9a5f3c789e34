"""Fuzzing the loaders of user input with Hypothesis: whatever the bytes, the answer is a valid result or a
ConfigError (one line for the user), never another exception (a traceback)."""

import contextlib
import copy
import io as stdlib_io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import data, io
from pipeline.config import ConfigError, load_params
from pipeline.models import resolve
from tests.test_config import REPO

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def key_paths(tree, prefix=()):
    paths = []
    for key, value in tree.items():
        paths.append(prefix + (key,))
        if isinstance(value, dict):
            paths += key_paths(value, prefix + (key,))
    return paths


PARAM_PATHS = key_paths(VALID_PARAMS)


@contextlib.contextmanager
def scratch_file(name: str):
    # Hypothesis reruns the test body many times per pytest test: one fresh directory per example.
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / name


def loads_cleanly(function, *args):
    """Call a loader: a result or a ConfigError are both clean answers; anything else fails the test."""
    try:
        return function(*args)
    except ConfigError as error:
        assert "\n" not in str(error)  # one line
        return None


@FUZZ
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_params_file_of_random_bytes(content):
    with scratch_file("params.yaml") as path:
        path.write_bytes(content)
        loads_cleanly(load_params, path)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PARAM_PATHS), st.sampled_from(["replace", "delete", "add"]), yaml_values),
        min_size=1, max_size=3,
    )
)
def test_params_with_random_edits(edits):
    params = copy.deepcopy(VALID_PARAMS)
    for key_path, operation, value in edits:
        parent = params
        for key in key_path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if operation == "replace":
            parent[key_path[-1]] = value
        elif operation == "delete":
            parent.pop(key_path[-1], None)
        else:
            parent[f"{key_path[-1]}_extra"] = value
    # Offline: a random Hub-like name must be answered from the cache check, not by probing the network.
    with scratch_file("params.yaml") as path, mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
        path.write_text(yaml.safe_dump(params, allow_unicode=True))
        loads_cleanly(load_params, path)


@FUZZ
@given(content=st.binary(max_size=400))
def test_jsonl_of_random_bytes(content):
    with scratch_file("dolly.jsonl") as path:
        path.write_bytes(content)
        numbered = loads_cleanly(data.read_jsonl_numbered, path)
        if numbered is not None:
            assert all(isinstance(record, dict) for _, record in numbered)
            loads_cleanly(data.validate_dolly_records, [r for _, r in numbered], str(path), [n for n, _ in numbered])


dolly_like_records = st.dictionaries(
    st.sampled_from(["instruction", "context", "response", "category", "references", "extra"]),
    json_values | st.text(max_size=20),
    max_size=6,
)


@FUZZ
@given(records=st.lists(dolly_like_records, min_size=1, max_size=5), cut=st.integers(min_value=0, max_value=30))
def test_jsonl_of_dolly_like_records_possibly_cut_short(records, cut):
    content = "".join(json.dumps(r) + "\n" for r in records).encode()
    with scratch_file("dolly.jsonl") as path:
        path.write_bytes(content[: len(content) - cut])
        numbered = loads_cleanly(data.read_jsonl_numbered, path)
        if numbered is None:
            return
        result = loads_cleanly(data.validate_dolly_records, [r for _, r in numbered], str(path), [n for n, _ in numbered])
        if result is not None:
            kept, _ = result
            for record in kept:
                assert all(isinstance(record[field], str) for field in data.REQUIRED_FIELDS)
                assert record["references"] and all(isinstance(r, str) for r in record["references"])


@FUZZ
@given(content=st.binary(max_size=300))
def test_pretrain_text_corpus_of_random_bytes(content):
    with scratch_file("corpus.txt") as path:
        path.write_bytes(content)
        documents = loads_cleanly(data.read_pretrain_documents, "text", str(path), 100)
        assert documents is None or (documents and all(isinstance(d, str) for d in documents))


def good_split_bytes() -> bytes:
    examples = [data.TokenizedExample(input_ids=list(range(i + 3)), prompt_length=i + 1) for i in range(4)]
    buffer = stdlib_io.BytesIO()
    split = data.TokenizedSplit.from_examples(examples)
    np.savez(buffer, tokens=split.tokens, offsets=split.offsets, prompt_lengths=split.prompt_lengths)
    return buffer.getvalue()


GOOD_SPLIT = good_split_bytes()
GOOD_NPY_BUFFER = stdlib_io.BytesIO()
np.save(GOOD_NPY_BUFFER, np.arange(4))
GOOD_NPY = GOOD_NPY_BUFFER.getvalue()  # a bare array where an archive of named arrays belongs


@FUZZ
@given(content=st.binary(max_size=600) | st.just(GOOD_SPLIT[:200]) | st.just(GOOD_NPY) | st.just(GOOD_NPY[:60]))
def test_tokenized_split_of_random_bytes(content):
    with scratch_file("train.npz") as path:
        path.write_bytes(content)
        loads_cleanly(data.TokenizedSplit.parse, path)


@st.composite
def split_arrays(draw):
    """Arrays as a writer would save them: mostly consistent (offsets from real lengths), then perhaps damaged."""
    lengths = draw(st.lists(st.integers(min_value=-1, max_value=5), max_size=5))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(max(int(offsets[-1]), 0), dtype=np.int32)
    prompt_lengths = np.array(draw(st.lists(st.integers(min_value=-2, max_value=6), min_size=len(lengths),
                                            max_size=len(lengths))), dtype=np.int32)
    fields = {"tokens": tokens, "offsets": offsets, "prompt_lengths": prompt_lengths}
    damage = draw(st.sampled_from([None, "drop", "float", "2d", "strings", "shift", "shorter"]))
    name = draw(st.sampled_from(sorted(fields)))
    if damage == "drop":
        fields.pop(name)
    elif damage == "float":
        fields[name] = fields[name].astype(np.float64)
    elif damage == "2d":
        fields[name] = fields[name].reshape(1, -1)
    elif damage == "strings":
        fields[name] = fields[name].astype(str)
    elif damage == "shift":
        fields[name] = fields[name] + 1
    elif damage == "shorter":
        fields[name] = fields[name][:-1]
    return fields


@FUZZ
@given(fields=split_arrays())
def test_tokenized_split_with_inconsistent_arrays(fields):
    """What a buggy writer could save: every accepted split must give every example with its prompt inside it."""
    with scratch_file("train.npz") as path:
        np.savez(path, **fields)
        split = loads_cleanly(data.TokenizedSplit.parse, path)
        if split is not None:
            for index in range(len(split)):
                ids, prompt_length = split.example(index)
                assert 0 <= prompt_length <= len(ids) and len(ids) >= 1


@FUZZ
@given(position=st.integers(min_value=0, max_value=len(GOOD_SPLIT) - 1), flip=st.integers(min_value=1, max_value=255),
       truncate=st.booleans())
def test_any_damage_to_a_saved_split_is_detected(position, flip, truncate):
    with scratch_file("train.npz") as path:
        path.write_bytes(GOOD_SPLIT)
        io.write_file_checksum(path)
        flipped = GOOD_SPLIT[:position] + bytes([GOOD_SPLIT[position] ^ flip]) + GOOD_SPLIT[position + 1 :]
        damaged = GOOD_SPLIT[:position] if truncate else flipped
        path.write_bytes(damaged)
        with pytest.raises(ConfigError, match="corrupted"):
            data.TokenizedSplit.load(path)


@FUZZ
@given(manifest=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       pointer=st.binary(max_size=100) | json_values.map(lambda v: json.dumps({"name_or_path": v}).encode()))
def test_checkpoint_manifest_and_pointer_of_random_content(manifest, pointer):
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "pretrained.json").write_bytes(pointer)
        loads_cleanly(resolve, directory)  # no manifest: the pointer itself is parsed
        (Path(directory) / io.CHECKSUM_FILE).write_bytes(manifest)
        loads_cleanly(io.verify_checksums, directory)
