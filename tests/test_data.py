"""Prompt template, tokenization and label masking (spec §1), data-file errors, PT packing, vocab check."""

import json

import numpy as np
import pytest

from pipeline import data
from pipeline.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Below is an instruction that describes a task.", "The cat sat on the mat.", "Name one red fruit: apple"] * 20
    return data.train_bpe_tokenizer(texts, vocab_size=300)


def test_prompt_template_matches_spec_exactly():
    assert data.build_prompt("Add 2 and 3.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert data.build_prompt("Who?", "Ann met Bo.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWho?\n\n### Input:\nAnn met Bo.\n\n### Response:\n"
    )


def test_tokenization_follows_spec_and_labels_mask_the_prompt(tokenizer):
    prompt, response = data.build_prompt("Name one red fruit.", ""), "apple"
    example = data.tokenize_example(tokenizer, prompt, response, max_length=512, max_prompt_length=256)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    full_ids = tokenizer.encode(prompt + response, add_special_tokens=False)
    assert example.prompt_length == len(prompt_ids)
    assert example.input_ids == full_ids + [tokenizer.eos_token_id]

    other = data.tokenize_example(tokenizer, data.build_prompt("Hi", ""), "cat sat", 512, 256)
    split = data.TokenizedSplit.from_examples([example, other])
    batch = data.sft_batch(split, [0, 1], pad_token_id=tokenizer.eos_token_id)
    for row, ex in enumerate([example, other]):
        n = len(ex.input_ids)
        labels = batch["labels"][row].tolist()
        assert labels[: ex.prompt_length] == [-100] * ex.prompt_length
        assert labels[ex.prompt_length : n] == ex.input_ids[ex.prompt_length :]
        assert labels[n:] == [-100] * (len(labels) - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(labels) - n)
    assert labels[n - 1] == tokenizer.eos_token_id  # the EOS is learned: it is how the model stops


def test_long_prompts_are_dropped_and_sequences_cut(tokenizer):
    prompt = data.build_prompt("Name one red fruit.", "")
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert data.tokenize_example(tokenizer, prompt, "apple", 512, max_prompt_length=n_prompt - 1) is None
    cut = data.tokenize_example(tokenizer, prompt, "apple apple apple apple", max_length=n_prompt + 2, max_prompt_length=n_prompt)
    assert len(cut.input_ids) == n_prompt + 2


def test_tokenized_split_roundtrip_and_corruption_detected(tokenizer, tmp_path):
    examples = [data.tokenize_example(tokenizer, data.build_prompt(f"Task {i}", ""), "cat", 512, 256) for i in range(3)]
    split = data.TokenizedSplit.from_examples(examples)
    split.save(tmp_path / "s.npz")
    loaded = data.TokenizedSplit.load(tmp_path / "s.npz")
    assert [loaded.example(i) for i in range(3)] == [(e.input_ids, e.prompt_length) for e in examples]
    with np.load(tmp_path / "s.npz") as arrays:
        np.savez(tmp_path / "bad.npz", tokens=arrays["tokens"][:-1], offsets=arrays["offsets"], prompt_lengths=arrays["prompt_lengths"])
    with pytest.raises(ConfigError, match="corrupted"):
        data.TokenizedSplit.load(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:50])
    with pytest.raises(ConfigError, match="trunc.npz"):
        data.TokenizedSplit.load(tmp_path / "trunc.npz")


def test_read_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"instruction": "a", "context": "", "response": "b", "category": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_jsonl(path)
    path.write_bytes(good.encode() + b"\n\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: not valid UTF-8"):
        data.read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected a JSON object"):
        data.read_jsonl(path)


def test_dolly_schema_missing_field_and_empty_response_policy():
    ok = {"instruction": "a", "context": "", "response": "b", "category": "c"}
    with pytest.raises(ConfigError, match=r"src: record 2: missing field 'response'"):
        data.validate_dolly_records([ok, {"instruction": "a", "context": "", "category": "c"}], "src")
    kept, dropped = data.validate_dolly_records([ok, ok | {"response": "  "}], "src")
    assert dropped == 1 and kept == [ok | {"references": ["b"]}]


def test_pretrain_blocks_concatenate_with_eos_and_drop_the_tail(tokenizer):
    docs = ["cat sat", "the mat"]
    stream = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    blocks = data.pack_pretrain_blocks(tokenizer, docs, block_size=2)
    assert blocks.tolist() == [stream[i : i + 2] for i in range(0, len(stream) - 1, 2) if i + 2 <= len(stream)]
    with pytest.raises(ConfigError, match="block_size"):
        data.pack_pretrain_blocks(tokenizer, docs, block_size=10_000)


def test_tokenizers_compared_by_vocabulary_not_size():
    a = data.train_bpe_tokenizer(["aaa bbb ccc"] * 10, vocab_size=300)
    b = data.train_bpe_tokenizer(["xxx yyy zzz"] * 10, vocab_size=300)
    assert len(a) == len(b)
    data.check_same_tokenizer(a, data.train_bpe_tokenizer(["aaa bbb ccc"] * 10, vocab_size=300), "t", "s")
    with pytest.raises(ConfigError, match="tokenizers differ"):
        data.check_same_tokenizer(a, b, "t", "s")
