"""The build_data stage on a local Dolly-format JSONL source, and its clean failure on a malformed file."""

import json
import subprocess

import numpy as np
import yaml
from transformers import AutoTokenizer

from pipeline.data import TokenizedSplit
from tests.test_config import REPO
from tests.workspace import dvc_project, stage_command

RECORDS = [
    {"instruction": f"Question {i}: who wrote “Les Misérables”?", "context": "Victor Hugo, 1862.\nA novel." if i % 2 else "",
     "response": f"Victor Hugo wrote it.\nIt was published in 1862 ({i}).", "category": "open_qa"}
    for i in range(12)
] + [{"instruction": "Empty one", "context": "", "response": "   ", "category": "open_qa"}]


def run_build_data(tmp_path, lines: list[str], eval_sets: dict | None = None, **data_overrides):
    source = tmp_path / "dolly.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = yaml.safe_load((REPO / "tests" / "micro_params.yaml").read_text())
    params["data"].update(source="jsonl", jsonl_path=str(source), valid_size=2, test_size=3, tokenizer_vocab_size=300,
                          max_length=512, max_prompt_length=448, eval_sets=eval_sets or {})
    params["data"].update(data_overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc_project(tmp_path)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "HOME": str(tmp_path)}
    return subprocess.run(stage_command("build_data", tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True)


def test_jsonl_source_builds_splits_with_the_spec_tokenization(tmp_path):
    completed = run_build_data(tmp_path, [json.dumps(r, ensure_ascii=False) for r in RECORDS])
    assert completed.returncode == 0, completed.stderr
    data = tmp_path / "data"
    stats = json.loads((data / "stats.json").read_text())
    assert stats["dropped_empty_response"] == 1
    assert (stats["train_examples"], stats["valid_examples"], stats["eval_dollyeval_examples"]) == (7, 2, 3)
    train = [json.loads(line) for line in (data / "instructions" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("Misérables" in r["instruction"] for r in train)
    split = TokenizedSplit.load(data / "tokenized" / "train.npz")
    ids, prompt_length = split.example(0)
    assert ids[-1] == AutoTokenizer.from_pretrained(data / "tokenizer").eos_token_id
    assert 0 < prompt_length < len(ids)
    assert np.load(data / "pretrain" / "blocks.npy").ndim == 2


def test_malformed_jsonl_names_file_and_line_and_writes_nothing(tmp_path):
    lines = [json.dumps(r) for r in RECORDS[:3]] + ['{"instruction": "broken"']
    completed = run_build_data(tmp_path, lines)
    assert completed.returncode == 2
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {tmp_path / 'dolly.jsonl'}:4: not valid JSON (Expecting ',' delimiter)"
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "data").exists()


def test_local_evaluation_sets_in_the_minillm_format_keep_long_gold_responses_for_sni(tmp_path):
    eleven_words = "one two three four five six seven eight nine ten eleven"
    sni = [
        {"instruction": "Summarise.", "input": "A text.", "output": eleven_words},
        {"instruction": "Too short.", "input": "", "output": "only nine words here so it is dropped now"},
        {"instruction": "Two golds.", "input": "", "output": ["short one", eleven_words + " twelve"]},
    ]
    (tmp_path / "sni.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sni), encoding="utf-8")
    selfinst = [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    (tmp_path / "selfinst.jsonl").write_text(json.dumps(selfinst[0]) + "\n", encoding="utf-8")
    completed = run_build_data(tmp_path, [json.dumps(r, ensure_ascii=False) for r in RECORDS],
                               eval_sets={"sni": str(tmp_path / "sni.jsonl"), "selfinst": str(tmp_path / "selfinst.jsonl")})
    assert completed.returncode == 0, completed.stderr
    kept = [json.loads(line) for line in (tmp_path / "data" / "eval" / "sni.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in kept] == ["Summarise.", "Two golds."]
    assert kept[1]["references"] == [eleven_words + " twelve"]  # the short reference is dropped, not the record
    assert kept[0]["context"] == "A text."
    selfinst_kept = [json.loads(line) for line in (tmp_path / "data" / "eval" / "selfinst.jsonl").read_text().splitlines()]
    assert selfinst_kept[0]["response"] == "Hi."  # no length filter outside S-NI and UnNI


def test_long_evaluation_prompts_are_kept_for_truncation_only_when_asked(tmp_path):
    """data.long_eval_prompts: truncate keeps every evaluation record (evaluation cuts its prompt); training and
    validation prompts over max_prompt_length are dropped either way."""
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    counts = {}
    for mode in ("drop", "truncate"):
        root = tmp_path / mode
        root.mkdir()
        completed = run_build_data(root, lines, max_prompt_length=180, long_eval_prompts=mode)
        assert completed.returncode == 0, completed.stderr
        counts[mode] = json.loads((root / "data" / "stats.json").read_text())
    drop, truncate = counts["drop"], counts["truncate"]
    assert drop["eval_dollyeval_dropped_long_prompt"] > 0, "prompts with a context (214 tokens) must be over 180 for this to mean anything"
    assert truncate["eval_dollyeval_examples"] == drop["eval_dollyeval_examples"] + drop["eval_dollyeval_dropped_long_prompt"]
    assert truncate["eval_dollyeval_truncated_long_prompt"] == drop["eval_dollyeval_dropped_long_prompt"]
    assert truncate["eval_dollyeval_dropped_long_prompt"] == 0
    assert (truncate["train_examples"], truncate["valid_examples"]) == (drop["train_examples"], drop["valid_examples"])


def test_given_splits_are_used_as_they_are(tmp_path):
    """data.splits: the three files are the splits, in their order, in either format (the authors' files are in the
    MiniLLM one); nothing is shuffled and valid_size/test_size do not apply."""
    files = {}
    for name, records in (("train", RECORDS[:8]), ("valid", RECORDS[8:10]), ("test", RECORDS[10:12] + RECORDS[12:])):
        files[name] = tmp_path / f"{name}.jsonl"
        minillm_format = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in records]
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in minillm_format), encoding="utf-8")
    completed = run_build_data(tmp_path, ["{}"], jsonl_path=None, splits={k: str(v) for k, v in files.items()})
    assert completed.returncode == 0, completed.stderr
    data = tmp_path / "data"
    stats = json.loads((data / "stats.json").read_text())
    assert (stats["train_examples"], stats["valid_examples"], stats["eval_dollyeval_examples"]) == (8, 2, 2)
    assert stats["dropped_empty_response"] == 1  # the test file's empty response
    dollyeval = [json.loads(line) for line in (data / "eval" / "dollyeval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["instruction"] for r in dollyeval] == [r["instruction"] for r in RECORDS[10:12]]
    assert dollyeval[1]["context"] == RECORDS[11]["context"]
