"""Teacher and student: a pretrained causal LM (`name_or_path`) or a GPT-2, OPT, Llama or Qwen2 decoder built from an
architecture config."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.config import HUB_REPO_ID, Architecture, ConfigError, LoRA, hub_offline
from pipeline.io import atomic_directory, verify_checksums, write_checksums

POINTER_FILE = "pretrained.json"  # a base "checkpoint" that only names a pretrained model


def build_causal_lm(arch: Architecture, vocab_size: int, n_positions: int, eos_token_id: int) -> PreTrainedModel:
    """A randomly initialised decoder of `arch.family`, from that family's own config class: our widths, the
    tokenizer's size, and EOS as BOS and pad too (spec §1). Everything else keeps the family's defaults (OPT's ReLU
    and pre-norm, Llama's SwiGLU, RMSNorm and rotary positions, Qwen2's q/k/v biases)."""
    special_tokens = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    ffn_dim = arch.ffn_dim or 4 * arch.n_embd
    if arch.family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=arch.n_embd,
            n_layer=arch.n_layer,
            n_head=arch.n_head,
            n_inner=arch.ffn_dim,  # None: GPT-2's 4 * n_embd
            # GPT-2's tanh-approximated GELU as one fused op: "gelu_new" computes the same function in seven
            # elementwise ops, ~8% of a tiny model's CPU training step, more in backward.
            activation_function="gelu_pytorch_tanh",
            **special_tokens,
        )
        return GPT2LMHeadModel(config)
    if arch.family == "opt":
        config = OPTConfig(
            vocab_size=vocab_size,
            max_position_embeddings=n_positions,
            hidden_size=arch.n_embd,
            word_embed_proj_dim=arch.n_embd,  # OPT-350M alone projects its embeddings; the others do not
            num_hidden_layers=arch.n_layer,
            num_attention_heads=arch.n_head,
            ffn_dim=ffn_dim,
            **special_tokens,
        )
        return OPTForCausalLM(config)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if arch.family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(
        vocab_size=vocab_size,
        max_position_embeddings=n_positions,
        hidden_size=arch.n_embd,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        num_key_value_heads=arch.n_kv_head or arch.n_head,
        intermediate_size=ffn_dim,
        **special_tokens,
    )
    return model_class(config)


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
    """The causal LM at `path`, its vocabulary cut to its tokenizer's (fit_vocabulary)."""
    source = resolve(path)
    offline = _offline_kwargs(source)
    # With peft installed, AutoModelForCausalLM first looks for an adapter_config.json, and that lookup (transformers
    # 5.24) takes local_files_only from adapter_kwargs only: without it an offline load retried the Hub for ~25 s.
    if offline:
        offline["adapter_kwargs"] = dict(offline)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **offline)
    except OSError as error:
        raise ConfigError(f"cannot load model '{source}': {str(error).splitlines()[0]}") from None
    fit_vocabulary(model, len(_tokenizer(source)), source)
    return model


def fit_vocabulary(model, tokenizer_size: int, name: str) -> None:
    """Cut an embedding padded past the tokenizer down to the tokenizer's tokens, in place.

    Checkpoints often pad their embedding to a multiple of 64 or 128 rows that no token id reaches: Qwen2.5's
    tokenizer has 151,665 tokens, its 0.5B-3B models 151,936 rows and its 7B+ models 152,064; OPT's has 50,265 and
    its models 50,272. Teacher and student then share a tokenizer but not a logits width, and the rows past the
    tokenizer still take probability mass that no text can carry. Cutting both to the tokenizer's size makes their
    distributions range over the same real vocabulary; a model with fewer rows than its tokenizer is an error."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < tokenizer_size:
        raise ConfigError(f"{name}: the model has {rows} vocabulary rows but its tokenizer {tokenizer_size} tokens")
    if rows > tokenizer_size:
        print(f"{name}: vocabulary padded to {rows} rows; restricted to the tokenizer's {tokenizer_size} tokens")
        model.resize_token_embeddings(tokenizer_size)


def load_tokenizer(path: str | Path):
    return _tokenizer(resolve(path))


def _tokenizer(source: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_offline_kwargs(source))
    except OSError as error:
        raise ConfigError(f"cannot load tokenizer '{source}': {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # spec §1: pad = EOS
    return tokenizer


def add_lora(model, lora: LoRA | None) -> None:
    """Inject LoRA adapters into `model`'s `lora.target_modules`, in place, and freeze every other weight; no-op for
    None. The model keeps its class, so the recipes, the fused losses and the checkpointer run unchanged on it."""
    if lora is None:
        return
    from peft import LoraConfig, inject_adapter_in_model

    # GPT-2's Conv1D layers store their weight transposed (fan_in_fan_out); peft would detect it, with a warning.
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        fan_in_fan_out=model.config.model_type == "gpt2")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # peft: no module of that name
        raise ConfigError(f"engine.lora.target_modules: {str(error).splitlines()[0]}") from None
    if has_adapters(model.get_output_embeddings()):
        raise ConfigError("engine.lora.target_modules: the LM head cannot take an adapter (the fused losses read its weight)")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` holds LoRA layers. Our decoders (pipeline/generation.py) read weights directly, which would skip
    the adapters; peft is imported only by add_lora, so without it no model has them."""
    peft_lora = sys.modules.get("peft.tuners.lora")
    return peft_lora is not None and any(isinstance(module, peft_lora.LoraLayer) for module in model.modules())


def merged(model):
    """`model`, or a copy with each LoRA adapter merged into the weight it adapts and its layer put back to that weight's
    plain module: the model a plain checkpoint of its family holds (W + B A alpha / r)."""
    if not has_adapters(model):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, sys.modules["peft.tuners.lora"].LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    """A Hugging Face directory with checksums; a LoRA model is saved merged (`merged`), loadable as its family."""
    model = merged(model)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_checksums(tmp)


def save_pointer(name_or_path: str, out_dir: str | Path) -> None:
    with atomic_directory(out_dir) as tmp:
        (tmp / POINTER_FILE).write_text(json.dumps({"name_or_path": name_or_path}) + "\n")
        write_checksums(tmp)


def count_parameters(model) -> int:
    # A ZeRO-3 parameter holds only its shard; ds_numel is its whole size.
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
