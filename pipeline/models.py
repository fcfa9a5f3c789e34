"""Teacher and student: a pretrained causal LM (`name_or_path`) or a GPT-2 built from an architecture config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pipeline.config import HUB_REPO_ID, Architecture, ConfigError, hub_offline
from pipeline.io import atomic_directory, verify_checksums, write_checksums

POINTER_FILE = "pretrained.json"  # a base "checkpoint" that only names a pretrained model


def build_gpt2(arch: Architecture, vocab_size: int, n_positions: int, eos_token_id: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        # GPT-2's tanh-approximated GELU as one fused op: "gelu_new" computes the same function in seven
        # elementwise ops, ~8% of a tiny model's CPU training step, more in backward.
        activation_function="gelu_pytorch_tanh",
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return GPT2LMHeadModel(config)


def resolve(path: str | Path) -> str:
    """A checkpoint directory (checked against its checksums), or the name_or_path its pointer file names.

    A path that is neither a directory nor a Hub id is a missing checkpoint: say so, rather than let
    `from_pretrained` report an invalid repo id."""
    path = Path(path)
    if not os.path.isdir(path):
        if not HUB_REPO_ID.match(str(path)) or ".." in str(path):
            raise ConfigError(f"{path}: checkpoint directory not found")
        return str(path)
    verify_checksums(path)
    pointer = path / POINTER_FILE
    if not pointer.is_file():
        return str(path)
    try:
        name_or_path = json.loads(pointer.read_text(encoding="utf-8"))["name_or_path"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{pointer}: unreadable pointer file") from None
    if not isinstance(name_or_path, str):
        raise ConfigError(f"{pointer}: unreadable pointer file")
    return name_or_path


def _offline_kwargs(source: str) -> dict:
    # HF_HUB_OFFLINE is read once at import; honour it when set later too (tests, notebooks) so nothing retries.
    return {"local_files_only": True} if hub_offline() and not os.path.isdir(source) else {}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    source = resolve(path)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_offline_kwargs(source))
    except OSError as error:
        raise ConfigError(f"cannot load model '{source}': {str(error).splitlines()[0]}") from None


def load_tokenizer(path: str | Path):
    source = resolve(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_offline_kwargs(source))
    except OSError as error:
        raise ConfigError(f"cannot load tokenizer '{source}': {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # spec §1: pad = EOS
    return tokenizer


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_checksums(tmp)


def save_pointer(name_or_path: str, out_dir: str | Path) -> None:
    with atomic_directory(out_dir) as tmp:
        (tmp / POINTER_FILE).write_text(json.dumps({"name_or_path": name_or_path}) + "\n")
        write_checksums(tmp)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
