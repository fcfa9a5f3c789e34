"""Teacher and student: a pretrained causal LM (`name_or_path`) or a GPT-2 built from an architecture config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pipeline.config import Architecture, ConfigError
from pipeline.io import atomic_directory

POINTER_FILE = "pretrained.json"  # a base "checkpoint" that only names a pretrained model


def build_gpt2(arch: Architecture, vocab_size: int, n_positions: int, eos_token_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return GPT2LMHeadModel(config)


def resolve(path: str | Path) -> str:
    """A checkpoint directory, or the name_or_path its pointer file names."""
    pointer = Path(path) / POINTER_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["name_or_path"]
    return str(path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    source = resolve(path)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise ConfigError(f"cannot load model '{source}': {str(error).splitlines()[0]}") from None


def load_tokenizer(path: str | Path):
    source = resolve(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ConfigError(f"cannot load tokenizer '{source}': {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # spec §1: pad = EOS
    return tokenizer


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def save_pointer(name_or_path: str, out_dir: str | Path) -> None:
    with atomic_directory(out_dir) as tmp:
        (tmp / POINTER_FILE).write_text(json.dumps({"name_or_path": name_or_path}) + "\n")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
