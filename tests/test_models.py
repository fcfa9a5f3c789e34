"""Building, saving and loading models of every family (pipeline/models.py), and the fitting of a padded vocabulary
to its tokenizer, on tiny configs; and the hidden-state path the fused losses read, against the models' own logits."""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline import data
from pipeline.config import Architecture, ConfigError
from pipeline.generation import left_pad, sample
from pipeline.hidden_states import response_hidden, with_lm_head
from pipeline.models import build_causal_lm, fit_vocabulary, load_model, load_tokenizer, save_checkpoint

FAMILIES = ("gpt2", "opt", "llama", "qwen2")
EOS = 0


def tiny_tokenizer():
    return data.train_bpe_tokenizer(["Name a city. Paris is one.", "Sort: b a c. a b c."] * 10, vocab_size=300)


def tiny(family: str, vocab_size: int = 50, seed: int = 0, **widths) -> torch.nn.Module:
    torch.manual_seed(seed)
    arch = Architecture(family=family, n_layer=2, n_embd=16, n_head=4, **widths)
    return build_causal_lm(arch, vocab_size, 64, EOS).eval()


def test_each_family_builds_its_own_class_with_our_widths() -> None:
    classes = {"gpt2": GPT2LMHeadModel, "opt": OPTForCausalLM, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    for family, model_class in classes.items():
        model = tiny(family)
        assert type(model) is model_class
        assert model.get_output_embeddings().weight.shape == (50, 16)
        assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == EOS
    gqa = tiny("llama", n_kv_head=2, ffn_dim=40)
    attention = gqa.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (2 * 4, 16)  # 2 key/value heads of width 16 / 4
    assert gqa.model.layers[0].mlp.up_proj.weight.shape == (40, 16)
    assert tiny("opt").model.decoder.layers[0].fc1.weight.shape == (64, 16)  # default 4 * n_embd
    assert tiny("gpt2", ffn_dim=24).transformer.h[0].mlp.c_fc.weight.shape == (16, 24)  # Conv1D: [in, out]


def test_architecture_rejects_grouped_query_attention_where_it_does_not_exist() -> None:
    with pytest.raises(ValueError, match="n_kv_head: grouped-query attention is for llama and qwen2, not opt"):
        Architecture(family="opt", n_layer=1, n_embd=16, n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match=r"n_head \(4\) must be divisible by n_kv_head \(3\)"):
        Architecture(family="qwen2", n_layer=1, n_embd=16, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="family"):
        Architecture(family="mamba", n_layer=1, n_embd=16, n_head=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_checkpoint_reloads_to_the_same_logits(family, tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny(family, vocab_size=len(tokenizer))
    save_checkpoint(model, tokenizer, tmp_path / "model")
    reloaded = load_model(tmp_path / "model").eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_losses_hidden_states_times_the_head_are_the_models_logits(family) -> None:
    """response_hidden's hidden states (the forward's last, its head kept to one position) through the LM head must be the full model's
    logits at the positions that predict each response token (OPT's final norm and Llama's RMSNorm included)."""
    model = tiny(family)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12], [4]], EOS)
    rollout = sample(model, prompt_ids, prompt_mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = response_hidden(model, rollout, torch.arange(3))
        head = with_lm_head(model, lambda weight: weight)
        ids = torch.cat([prompt_ids, rollout.response_ids], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(rollout.response_ids)], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    width = prompt_ids.shape[1]
    torch.testing.assert_close(hidden @ head.T, logits[:, width - 1 : -1], atol=1e-5, rtol=0)


def padded_qwen2(rows: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=EOS, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def test_a_vocabulary_padded_past_the_tokenizer_is_cut_to_it_keeping_the_real_rows(tmp_path, capsys) -> None:
    """The Qwen2.5 case: teacher and student share a tokenizer but pad their embeddings to different widths
    (151,936 vs 152,064 rows). Loading cuts each to the tokenizer's size; the real tokens' logits are unchanged."""
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    ids = torch.tensor([[1, 2, 3, size - 1]])
    for name, rows in (("student", size + 14), ("teacher", size + 78)):
        padded = padded_qwen2(rows, seed=rows)
        with torch.no_grad():
            real_logits = padded(ids).logits[..., :size]
        save_checkpoint(padded, tokenizer, tmp_path / name)
        loaded = load_model(tmp_path / name).eval()
        assert loaded.get_output_embeddings().weight.shape[0] == loaded.config.vocab_size == size
        assert loaded.get_input_embeddings().weight.data_ptr() == loaded.get_output_embeddings().weight.data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, real_logits, atol=1e-6, rtol=0)
        assert f"vocabulary padded to {rows} rows; restricted to the tokenizer's {size} tokens" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "teacher")) == size


def test_a_model_with_fewer_rows_than_its_tokenizer_is_an_error_naming_it() -> None:
    model = padded_qwen2(rows=30, seed=0)
    with pytest.raises(ConfigError, match="^some/dir: the model has 30 vocabulary rows but its tokenizer 50 tokens$"):
        fit_vocabulary(model, 50, "some/dir")


LORA_TARGETS = {"gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_only_adapters_and_merges_to_w_plus_scaled_ba(family, tmp_path) -> None:
    """After add_lora only the A and B matrices require grad; `merged` gives a plain model of the family whose
    adapted weights are W + (alpha / r) B A computed here by hand, whose logits are the adapted model's, and which
    saves and reloads as that family with no adapter key left."""
    from peft.tuners.lora import LoraLayer

    from pipeline.config import LoRA
    from pipeline.generation import fast_decoder
    from pipeline.models import add_lora, has_adapters, merged

    tokenizer = tiny_tokenizer()
    model = tiny(family, vocab_size=len(tokenizer))
    plain = {name: weight.clone() for name, weight in model.state_dict().items()}
    add_lora(model, LoRA(r=4, alpha=8.0, dropout=0.0, target_modules=LORA_TARGETS[family]))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert has_adapters(model) and fast_decoder(model) is None  # our decoders would skip the adapters
    for parameter in model.parameters():  # B starts at 0 (the adapted model is the plain one); move it
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.1)
    expected = dict(plain)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            delta = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight  # alpha / r = 2
            expected[f"{name}.weight"] = plain[f"{name}.weight"] + (delta.T if family == "gpt2" else delta)  # Conv1D: [in, out]
    ids = torch.randint(1, 50, (2, 9))
    merged_model = merged(model)
    assert type(merged_model) is type(tiny(family)) and not has_adapters(merged_model) and has_adapters(model)
    merged_state = merged_model.state_dict()
    assert set(merged_state) == set(plain)
    for name, weight in expected.items():
        torch.testing.assert_close(merged_state[name], weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged_model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    save_checkpoint(model, tokenizer, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged", torch.float32).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_lora_refuses_unknown_modules_and_the_lm_head() -> None:
    from pipeline.config import LoRA
    from pipeline.models import add_lora

    for targets, message in ((["nope"], "engine.lora.target_modules: Target modules {'nope'} not found"),
                             (["lm_head"], "engine.lora.target_modules: the LM head cannot take an adapter")):
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
            add_lora(tiny("llama"), LoRA(r=2, alpha=2.0, dropout=0.0, target_modules=targets))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(family) -> None:
    """engine.gradient_checkpointing: each decoder layer's parts run twice per step (forward, then again in backward)
    instead of once, and the gradients equal those without it (dropout included: the recompute replays its RNG state)."""
    from pipeline import engine
    from pipeline.config import EngineConfig, Optimizer

    ids = torch.randint(1, 50, (2, 9))
    gradients, layer_calls = {}, {}
    for checkpointing in (False, True):
        model = tiny(family).train()
        config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0,
                              gradient_checkpointing=checkpointing)
        engine.setup(config)
        optimizer = Optimizer(lr=1e-3, min_lr=0.0, weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_steps=0)
        model_engine = engine.initialize(model, optimizer, 1, 2, 1, config)
        calls = []  # the first decoder layer's parts (norms, attention, MLP) that run
        first_layer = next(module for name, module in model.named_modules() if name.endswith(("layers.0", "h.0")))
        for part in first_layer.children():
            part.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(5)
        loss = model_engine.module(ids, labels=ids).loss
        loss.backward()
        gradients[checkpointing] = {name: p.grad.clone() for name, p in model.named_parameters()}
        layer_calls[checkpointing] = len(calls)
    assert layer_calls[False] >= 4 and layer_calls[True] == 2 * layer_calls[False]
    for name, gradient in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], gradient, atol=1e-6, rtol=1e-5)
