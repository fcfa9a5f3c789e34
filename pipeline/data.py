"""Instruction data, prompt template and tokenization exactly as MINILLM_SPEC.md §1, plus the PT corpus.

Tokenization rule (spec §1): prompt_ids = enc(prompt); full = enc(prompt + response) + [EOS]; the response
tokens are what follows len(prompt_ids) in `full`. No special tokens are added. Examples whose prompt is
longer than max_prompt_length are dropped; `full` is cut at max_length. Labels are -100 on the prompt.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.config import ConfigError
from pipeline.io import atomic_write_bytes, verify_file_checksum, write_file_checksum

EOS_TOKEN = "<|endoftext|>"

PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

REQUIRED_FIELDS = ("instruction", "context", "response", "category")


def build_prompt(instruction: str, context: str) -> str:
    if context.strip():
        return PROMPT_WITH_CONTEXT.format(instruction=instruction, input=context)
    return PROMPT_NO_CONTEXT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------- records


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) per non-blank line. Names the file and line of anything malformed (bad UTF-8, bad
    JSON, not an object, a last line cut short) and refuses a file without records."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    records = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"{path}:{line_number}: not valid UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                # A last line without its newline that does not parse is a file cut short (copy, download, disk).
                truncated = "" if raw.endswith(b"\n") else "; the file looks truncated"
                raise ConfigError(f"{path}:{line_number}: not valid JSON ({error.msg}){truncated}") from None
            except RecursionError:
                raise ConfigError(f"{path}:{line_number}: not valid JSON (nested too deeply)") from None
            except ValueError as error:  # e.g. an integer of more than 4300 digits
                raise ConfigError(f"{path}:{line_number}: not valid JSON ({str(error).splitlines()[0]})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{line_number}: expected a JSON object")
            records.append((line_number, record))
    if not records:
        raise ConfigError(f"{path}: no records (the file is empty)")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    return [record for _, record in read_jsonl_numbered(path)]


def validate_dolly_records(records: list[dict], source: str, line_numbers: list[int] | None = None) -> tuple[list[dict], int]:
    """Check the Dolly schema; drop records with an empty response (documented policy) and count them.

    `references` (all valid responses) is optional; it defaults to [response]. Rouge-L takes the max over it.
    Errors name `source:line` when line numbers are given (a file), else `source: record n` (the Hub).
    """
    kept, dropped_empty = [], 0
    for index, record in enumerate(records, start=1):
        where = f"{source}:{line_numbers[index - 1]}" if line_numbers else f"{source}: record {index}"
        for field in REQUIRED_FIELDS:
            if field not in record:
                raise ConfigError(f"{where}: missing field '{field}'")
            if not isinstance(record[field], str):
                raise ConfigError(f"{where}: field '{field}' must be a string")
        if not record["response"].strip():
            dropped_empty += 1
            continue
        references = record.get("references", [record["response"]])
        if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
            raise ConfigError(f"{where}: 'references' must be a non-empty list of strings")
        kept.append({field: record[field] for field in REQUIRED_FIELDS} | {"references": references})
    return kept, dropped_empty


def load_dolly_from_hub() -> list[dict]:
    """databricks-dolly-15k from the Hugging Face Hub, for users who are online."""
    import datasets

    dataset = datasets.load_dataset("databricks/databricks-dolly-15k", split="train")
    return [dict(row) for row in dataset]


# The paper's other four evaluation sets as its authors publish them on the Hub (LMOps minillm/README.md; their
# evaluation scripts read <set>/valid.jsonl, and S-NI and UnNI from the `11_` folder). DollyEval is our own
# held-out split of Dolly (split_records).
HUB_EVAL_SETS = {
    "selfinst": ("MiniLLM/self-inst", "valid.jsonl"),
    "vicunaeval": ("MiniLLM/Vicuna", "valid.jsonl"),
    "sni": ("MiniLLM/sinst", "11_/valid.jsonl"),
    "unni": ("MiniLLM/uinst", "11_/valid.jsonl"),
}
MIN_GOLD_WORDS = {"sni": 11, "unni": 11}  # spec §1: S-NI and UnNI keep only gold responses of >= 11 words


def eval_set_records(raw: list[dict], name: str, source: str) -> tuple[list[dict], int]:
    """Evaluation records in either accepted format, as {instruction, context, response, category, references}:
      Dolly:   {"instruction", "context", "response", "category"?, "references"?: [str, ...]}
      MiniLLM: {"instruction", "input"?, "output": str or [str, ...]}   (the files of HUB_EVAL_SETS)
    All outputs or references count for Rouge-L's max; the first is the gold response. References that are empty,
    or for S-NI and UnNI under 11 words, are dropped; a record left without one is dropped and counted."""
    kept, dropped = [], 0
    for index, record in enumerate(raw, start=1):
        if "response" in record:
            context, references = record.get("context", ""), record.get("references", [record["response"]])
        elif "output" in record:
            context, output = record.get("input", ""), record["output"]
            references = output if isinstance(output, list) else [output]
        else:
            raise ConfigError(f"{source}: record {index}: needs 'response' (Dolly format) or 'output' (MiniLLM format)")
        if not isinstance(record.get("instruction"), str) or not isinstance(context, str):
            raise ConfigError(f"{source}: record {index}: 'instruction' and 'context'/'input' must be strings")
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise ConfigError(f"{source}: record {index}: responses must be strings")
        references = [r for r in references if r.strip() and len(r.split()) >= MIN_GOLD_WORDS.get(name, 0)]
        if not references:
            dropped += 1
            continue
        category = record.get("category", name)
        kept.append({"instruction": record["instruction"], "context": context, "response": references[0],
                     "category": category if isinstance(category, str) else name, "references": references})
    return kept, dropped


def load_eval_set_from_hub(name: str) -> tuple[list[dict], int]:
    """One of HUB_EVAL_SETS from the Hugging Face Hub, for users who are online."""
    import datasets

    repo, data_file = HUB_EVAL_SETS[name]
    dataset = datasets.load_dataset(repo, data_files=data_file, split="train")
    return eval_set_records([dict(row) for row in dataset], name, f"{repo}/{data_file}")


def split_records(records: list[dict], valid_size: int, test_size: int, seed: int):
    """Shuffle once with `seed`, then take test (DollyEval), valid, and the rest as train."""
    if valid_size + test_size >= len(records):
        raise ConfigError(
            f"data.valid_size + data.test_size ({valid_size + test_size}) leave no training data "
            f"out of {len(records)} records"
        )
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    test = shuffled[:test_size]
    valid = shuffled[test_size : test_size + valid_size]
    train = shuffled[test_size + valid_size :]
    return train, valid, test


# ------------------------------------------------------------------------------------------ tokenization


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on our own text; EOS doubles as pad, as in the spec."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def vocabulary_hash(tokenizer) -> str:
    """Hash of the token->id map itself: two tokenizers of equal size can still disagree."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    teacher_hash, student_hash = vocabulary_hash(teacher_tokenizer), vocabulary_hash(student_tokenizer)
    if teacher_hash != student_hash:
        raise ConfigError(
            f"teacher ({teacher_name}) and student ({student_name}) tokenizers differ: vocabulary hashes "
            f"{teacher_hash[:12]} vs {student_hash[:12]} (sizes {len(teacher_tokenizer)} vs {len(student_tokenizer)}); "
            "distillation needs one shared vocabulary"
        )


@dataclass
class TokenizedExample:
    input_ids: list[int]  # prompt + response + EOS, cut at max_length
    prompt_length: int


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int):
    """Spec §1 tokenization; None when the prompt is over max_prompt_length (the example is dropped)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(prompt_ids) > max_prompt_length:
        return None
    full_ids = tokenizer.encode(prompt + response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return TokenizedExample(input_ids=full_ids[:max_length], prompt_length=len(prompt_ids))


@dataclass
class TokenizedSplit:
    """Variable-length examples stored flat: tokens[offsets[i]:offsets[i+1]] is example i."""

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len N+1
    prompt_lengths: np.ndarray  # int32, len N

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def example(self, index: int) -> tuple[list[int], int]:
        ids = self.tokens[self.offsets[index] : self.offsets[index + 1]].tolist()
        return ids, int(self.prompt_lengths[index])

    def prompts(self) -> list[list[int]]:
        """Every example's prompt tokens (MiniLLM samples its own responses to them)."""
        return [ids[:prompt_length] for ids, prompt_length in map(self.example, range(len(self)))]

    @classmethod
    def from_examples(cls, examples: list[TokenizedExample]) -> TokenizedSplit:
        lengths = [len(e.input_ids) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        tokens = np.array([t for e in examples for t in e.input_ids], dtype=np.int32)
        prompt_lengths = np.array([e.prompt_length for e in examples], dtype=np.int32)
        return cls(tokens=tokens, offsets=offsets, prompt_lengths=prompt_lengths)

    def save(self, path: str | Path) -> None:
        """The .npz, and beside it its size and sha256, checked by `load`."""
        buffer = io.BytesIO()
        np.savez(buffer, tokens=self.tokens, offsets=self.offsets, prompt_lengths=self.prompt_lengths)
        atomic_write_bytes(path, buffer.getvalue())
        write_file_checksum(path)

    @classmethod
    def load(cls, path: str | Path) -> TokenizedSplit:
        verify_file_checksum(path)
        return cls.parse(path)

    @classmethod
    def parse(cls, path: str | Path) -> TokenizedSplit:
        """Read and check the arrays' layout (what the checksum cannot vouch for: a file saved by a buggy writer)."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                split = cls(arrays["tokens"], arrays["offsets"], arrays["prompt_lengths"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ConfigError(f"{path}: unreadable tokenized split ({' '.join(str(error).split())[:200]})") from None
        except (AttributeError, TypeError):  # a bare .npy array, not an archive of named arrays
            raise ConfigError(f"{path}: unreadable tokenized split (not an .npz archive)") from None
        arrays = (split.tokens, split.offsets, split.prompt_lengths)
        if any(a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) for a in arrays):
            raise ConfigError(f"{path}: corrupted tokenized split (arrays must be one-dimensional integers)")
        if len(split.offsets) != len(split.prompt_lengths) + 1 or split.offsets[0] != 0 or split.offsets[-1] != len(split.tokens):
            raise ConfigError(f"{path}: corrupted tokenized split (offsets do not match the token count)")
        lengths = np.diff(split.offsets)
        if (lengths < 1).any() or (split.prompt_lengths < 0).any() or (split.prompt_lengths > lengths).any():
            raise ConfigError(f"{path}: corrupted tokenized split (an example is empty or shorter than its prompt)")
        return split


def tokenize_records(tokenizer, records: list[dict], max_length: int, max_prompt_length: int):
    """Tokenize a split; returns (TokenizedSplit, the kept records, the number dropped for prompt length)."""
    examples, kept = [], []
    for record in records:
        prompt = build_prompt(record["instruction"], record["context"])
        example = tokenize_example(tokenizer, prompt, record["response"], max_length, max_prompt_length)
        if example is not None:
            examples.append(example)
            kept.append(record)
    return TokenizedSplit.from_examples(examples), kept, len(records) - len(kept)


def sft_batch(split: TokenizedSplit, indices, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels -100 on prompt and padding, so the loss covers response + EOS only."""
    rows = [split.example(int(i)) for i in indices]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -------------------------------------------------------------------------------------- pre-training data


def read_pretrain_documents(source: str, path: str | None, n_documents: int) -> list[str]:
    """Documents from a local text file (blank-line separated) or JSONL with a "text" field."""
    if source == "text":
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{file}: file not found (data.pretrain.path)")
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ConfigError(f"{file}:{line}: not valid UTF-8 ({error.reason})") from None
        documents = [d.strip() for d in text.split("\n\n") if d.strip()]
    else:
        documents = []
        for line_number, record in read_jsonl_numbered(path):
            if not isinstance(record.get("text"), str):
                raise ConfigError(f"{path}:{line_number}: missing string field 'text'")
            documents.append(record["text"])
    if not documents:
        raise ConfigError(f"{path}: no documents (data.pretrain.path)")
    return documents[:n_documents]


def pack_pretrain_blocks(tokenizer, documents: list[str], block_size: int) -> np.ndarray:
    """Spec §1: each document + EOS, concatenated, cut into full blocks (the tail is dropped)."""
    stream = []
    for document in documents:
        stream.extend(tokenizer.encode(document, add_special_tokens=False))
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ConfigError(
            f"pre-training corpus has {len(stream)} tokens, fewer than one block (data.pretrain.block_size={block_size})"
        )
    return np.array(stream[: n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)
