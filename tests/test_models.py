"""Building, saving and loading models of every family (pipeline/models.py), and the fitting of a padded vocabulary
to its tokenizer, on tiny configs; and the hidden-state path the fused losses read, against the models' own logits."""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline import data
from pipeline.config import Architecture, ConfigError
from pipeline.generation import left_pad, sample
from pipeline.hidden_states import response_hidden_and_head
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
    """response_hidden_and_head runs the body only; its hidden states through the LM head must be the full model's
    logits at the positions that predict each response token (OPT's final norm and Llama's RMSNorm included)."""
    model = tiny(family)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12], [4]], EOS)
    rollout = sample(model, prompt_ids, prompt_mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden, head = response_hidden_and_head(model, rollout, torch.arange(3))
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
