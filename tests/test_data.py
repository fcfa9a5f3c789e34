"""Prompt template, tokenization and label masking (spec §1), data-file errors, PT packing, vocab check."""

import json
from pathlib import Path

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
    # A writer that saved inconsistent arrays: the layout check catches what a checksum cannot.
    with np.load(tmp_path / "s.npz") as arrays:
        np.savez(tmp_path / "bad.npz", tokens=arrays["tokens"][:-1], offsets=arrays["offsets"], prompt_lengths=arrays["prompt_lengths"])
    with pytest.raises(ConfigError, match="corrupted"):
        data.TokenizedSplit.parse(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:50])
    with pytest.raises(ConfigError, match="trunc.npz"):
        data.TokenizedSplit.parse(tmp_path / "trunc.npz")


def test_tokenized_split_corruption_detected_by_size_and_hash(tokenizer, tmp_path):
    examples = [data.tokenize_example(tokenizer, data.build_prompt(f"Task {i}", ""), "cat", 512, 256) for i in range(3)]
    path = tmp_path / "train.npz"
    data.TokenizedSplit.from_examples(examples).save(path)
    good = path.read_bytes()

    path.write_bytes(good[:-10])  # cut short
    with pytest.raises(ConfigError, match=rf"{path}: corrupted: {len(good) - 10} bytes, {len(good)} when written"):
        data.TokenizedSplit.load(path)

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit in the middle of the archive: same size, different hash
    path.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=rf"{path}: corrupted: sha256 differs"):
        data.TokenizedSplit.load(path)

    path.write_bytes(good)
    Path(f"{path}.checksum.json").unlink()
    with pytest.raises(ConfigError, match=r"train.npz: no checksum file train.npz.checksum.json"):
        data.TokenizedSplit.load(path)


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


def test_read_jsonl_truncated_last_line_empty_file_and_oversized_numbers(tmp_path):
    good = json.dumps({"instruction": "a", "context": "", "response": "b", "category": "c"})
    path = tmp_path / "cut.jsonl"
    path.write_text(good + "\n" + good[:-7])  # the copy stopped mid-record, no final newline
    with pytest.raises(ConfigError, match=r"cut.jsonl:2: not valid JSON \(.*\); the file looks truncated$"):
        data.read_jsonl(path)
    path.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"cut.jsonl: no records \(the file is empty\)"):
        data.read_jsonl(path)
    path.write_text('{"a": ' + "9" * 5000 + "}\n")  # json raises a plain ValueError here, not JSONDecodeError
    with pytest.raises(ConfigError, match=r"cut.jsonl:1: not valid JSON"):
        data.read_jsonl(path)
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"cut.jsonl:1: not valid JSON"):
        data.read_jsonl(path)


def test_dolly_errors_name_the_file_line_when_known(tmp_path):
    ok = {"instruction": "a", "context": "", "response": "b", "category": "c"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ok) + "\n\n" + json.dumps(ok | {"category": 3}) + "\n")
    numbered = data.read_jsonl_numbered(path)
    assert [line for line, _ in numbered] == [1, 3]
    with pytest.raises(ConfigError, match=r"d.jsonl:3: field 'category' must be a string"):
        data.validate_dolly_records([r for _, r in numbered], str(path), [line for line, _ in numbered])


def test_pretrain_text_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first doc\n\nsecond \xe9 doc\n")
    with pytest.raises(ConfigError, match=r"corpus.txt:3: not valid UTF-8"):
        data.read_pretrain_documents("text", str(path), 10)
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(ConfigError, match=r"corpus.jsonl:3: missing string field 'text'"):
        data.read_pretrain_documents("jsonl", str(path), 10)


def test_tokenizers_with_the_same_tokens_under_other_ids_differ(tokenizer, tmp_path):
    """Same size, same token strings, two ids swapped: only a comparison of the token->id map sees it."""
    tokenizer.save_pretrained(tmp_path / "a")
    spec = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "b").mkdir()
    for name in (tmp_path / "a").iterdir():
        (tmp_path / "b" / name.name).write_bytes(name.read_bytes())
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(spec))
    from pipeline.models import load_tokenizer

    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    assert len(a) == len(b) and set(a.get_vocab()) == set(b.get_vocab())
    with pytest.raises(ConfigError, match=r"teacher \(t\) and student \(s\) tokenizers differ"):
        data.check_same_tokenizer(a, b, "t", "s")
