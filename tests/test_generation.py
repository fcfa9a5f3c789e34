"""Behaviour of the sampler against independent truths: direct forward passes, teacher-forced re-scoring,
transformers' own `generate`, and empirical token frequencies."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.config import Architecture
from pipeline.generation import GPT2Decoder, LlamaDecoder, Rollout, decode_responses, fast_decoder, left_pad, sample
from pipeline.models import build_causal_lm

VOCAB_SIZE = 50
EOS = 0
# chi-square critical value for 49 degrees of freedom (50 tokens) at p = 0.001 (scipy.stats.chi2.ppf(0.999, 49)).
CHI2_CRITICAL_49_DOF = 85.35


def tiny_gpt2(seed: int, eos_bias: float = 0.0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2. initializer_range 0.2 makes next-token distributions far from uniform (and two
    seeds far from each other) while keeping every token above ~1e-3, so frequency tests have power."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=EOS,
        eos_token_id=EOS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
    )
    model = GPT2LMHeadModel(config).eval()
    if eos_bias:
        # GPT-2's lm_head has no bias; giving it one that favours EOS makes rows end after a few tokens.
        bias = torch.zeros(VOCAB_SIZE)
        bias[EOS] = eos_bias
        model.lm_head.bias = torch.nn.Parameter(bias)
    return model


def teacher_forced_logprobs(model: GPT2LMHeadModel, rollout: Rollout) -> torch.Tensor:
    """log-prob of every response token from ONE forward pass over [prompt; response]."""
    prompt_length = rollout.prompt_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask.long(), rollout.response_mask.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    predicting_logits = logits[:, prompt_length - 1 : -1]
    return torch.log_softmax(predicting_logits, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)


def next_token_distribution(model: GPT2LMHeadModel, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)


def chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=VOCAB_SIZE).double()
    expected = expected_probs.double() * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [4], [20, 21, 22, 23]]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_token_frequencies_match_mixture(alpha: float) -> None:
    student, teacher = tiny_gpt2(seed=1), tiny_gpt2(seed=2)
    prompt = [3, 17, 8, 25]
    q = next_token_distribution(student, prompt)
    p = next_token_distribution(teacher, prompt)
    rows = 20_000
    prompt_ids = torch.tensor([prompt] * rows)
    rollout = sample(
        student, prompt_ids, torch.ones_like(prompt_ids), max_new_tokens=1, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(123), teacher=teacher, teacher_mix=alpha,
    )
    tokens = rollout.response_ids[:, 0]
    mixture = alpha * p + (1 - alpha) * q
    assert float((mixture * rows).min()) > 5  # chi-square approximation is valid on every cell
    assert chi_square(tokens, mixture) < CHI2_CRITICAL_49_DOF

    teacher_share = rollout.from_teacher.float().mean().item()
    standard_error = (alpha * (1 - alpha) / rows) ** 0.5
    assert abs(teacher_share - alpha) <= 4 * standard_error
    if alpha == 0.2:
        # The check has power: the same samples are rejected as coming from the student alone.
        assert chi_square(tokens, q) > 10 * CHI2_CRITICAL_49_DOF
        # from_teacher is truthful: tokens it marks follow p, the others follow q.
        marked = rollout.from_teacher[:, 0]
        assert chi_square(tokens[marked], p) < CHI2_CRITICAL_49_DOF
        assert chi_square(tokens[~marked], q) < CHI2_CRITICAL_49_DOF


@pytest.mark.parametrize("with_teacher, teacher_mix", [(False, 0.0), (True, 0.0), (True, 0.3), (True, 1.0)])
def test_cached_equals_uncached(with_teacher: bool, teacher_mix: float) -> None:
    student = tiny_gpt2(seed=1, eos_bias=2.0)
    teacher = tiny_gpt2(seed=2, eos_bias=2.0) if with_teacher else None
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollouts = [
        sample(
            student, prompt_ids, prompt_mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS,
            generator=torch.Generator().manual_seed(7), teacher=teacher, teacher_mix=teacher_mix, use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    cached, uncached = rollouts
    assert cached.response_ids.shape[1] > 3
    assert torch.equal(cached.response_ids, uncached.response_ids)
    assert torch.equal(cached.response_mask, uncached.response_mask)
    assert torch.equal(cached.from_teacher, uncached.from_teacher)
    torch.testing.assert_close(cached.student_logprobs, uncached.student_logprobs, atol=1e-4, rtol=0)
    if with_teacher:
        torch.testing.assert_close(cached.teacher_logprobs, uncached.teacher_logprobs, atol=1e-4, rtol=0)
    else:
        assert cached.teacher_logprobs is None


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_our_decoders_equal_transformers_cached_forward(family: str) -> None:
    """GPT2Decoder and LlamaDecoder (eval mode) against the model's own forward with a transformers cache (training
    mode, which the sampler routes through transformers; dropout is 0 in these tiny models, so the two compute the
    same function). Llama with grouped-query attention, Qwen2 with its q/k/v biases."""
    if family == "gpt2":
        student, teacher = tiny_gpt2(seed=1, eos_bias=2.0), tiny_gpt2(seed=2, eos_bias=2.0)
    else:
        student, teacher = tiny_of_family(family, 1), tiny_of_family(family, 2)
    assert fast_decoder(student) is (GPT2Decoder if family == "gpt2" else LlamaDecoder)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollouts = []
    for training in (False, True):
        student.train(training)
        teacher.train(training)
        rollouts.append(sample(
            student, prompt_ids, prompt_mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS,
            generator=torch.Generator().manual_seed(5), teacher=teacher, teacher_mix=0.3,
        ))
    decoder, framework = rollouts
    assert decoder.response_ids.shape[1] > 3
    assert torch.equal(decoder.response_ids, framework.response_ids)
    assert torch.equal(decoder.from_teacher, framework.from_teacher)
    torch.testing.assert_close(decoder.student_logprobs, framework.student_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder.teacher_logprobs, framework.teacher_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder.teacher_hidden, framework.teacher_hidden, atol=1e-5, rtol=0)


def test_llama_decoder_follows_the_models_rope_scaling() -> None:
    """Llama-3's rope scaling (rope_type llama3) changes the rotary frequencies; LlamaDecoder takes its cos/sin from
    the model's own rotary module, so it still equals the transformers forward (as in the test above)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=EOS,
                         bos_token_id=EOS, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.2)
    assert model.model.rotary_emb.rope_type == "llama3" and fast_decoder(model.eval()) is LlamaDecoder
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollouts = []
    for training in (False, True):
        model.train(training)
        rollouts.append(sample(model, prompt_ids, prompt_mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS,
                               generator=torch.Generator().manual_seed(5)))
    decoder, framework = rollouts
    assert torch.equal(decoder.response_ids, framework.response_ids)
    torch.testing.assert_close(decoder.student_logprobs, framework.student_logprobs, atol=1e-5, rtol=0)


def tiny_of_family(family: str, seed: int) -> torch.nn.Module:
    """A random 2-layer OPT, Llama (grouped-query: 4 heads, 2 key/value heads) or Qwen2 (q/k/v biases, tied
    embeddings), built by the pipeline's own builder, its matrices redrawn with std 0.2 for the reason tiny_gpt2 gives."""
    torch.manual_seed(seed)
    arch = Architecture(family=family, n_layer=2, n_embd=32, n_head=4, n_kv_head=2 if family != "opt" else None)
    model = build_causal_lm(arch, VOCAB_SIZE, 64, EOS)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["opt", "llama", "qwen2"])
def test_other_architectures_cached_sampling_equals_uncached_and_generate(family: str) -> None:
    """OPT (through a transformers cache), Llama and Qwen2 (through LlamaDecoder): cached equals uncached with a
    teacher mixed in; plain sampling equals transformers' `generate` under the same seed; and the log-probs are the
    model's own."""
    student, teacher = tiny_of_family(family, 3), tiny_of_family(family, 5)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    cached, uncached = (
        sample(student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS,
               generator=torch.Generator().manual_seed(4), teacher=teacher, teacher_mix=0.3, use_cache=use_cache)
        for use_cache in (True, False)
    )
    assert torch.equal(cached.response_ids, uncached.response_ids)
    assert cached.from_teacher.any() and (~cached.from_teacher & cached.response_mask.bool()).any()
    torch.testing.assert_close(cached.student_logprobs, uncached.student_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.teacher_logprobs, uncached.teacher_logprobs, atol=1e-4, rtol=0)
    rescored = teacher_forced_logprobs(teacher, cached) * cached.response_mask
    torch.testing.assert_close(cached.teacher_logprobs, rescored, atol=1e-4, rtol=0)

    torch.manual_seed(9)
    with torch.no_grad():
        generated = student.generate(prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                                     max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(9)
    ours = sample(student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS, generator=None)
    responses = generated[:, prompt_ids.shape[1] :]
    assert torch.equal(responses[:, : ours.response_ids.shape[1]], ours.response_ids)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_a_teacher_that_only_scores_runs_once_after_sampling_and_gives_the_in_loop_scores(family: str) -> None:
    """teacher_mix 0: the cached path scores the finished responses with one teacher forward; its log-probs and
    hidden states are those the uncached path computes token by token inside the loop, and the draws are unchanged."""
    student = tiny_gpt2(seed=3) if family == "gpt2" else tiny_of_family(family, 3)
    teacher = tiny_gpt2(seed=5) if family == "gpt2" else tiny_of_family(family, 5)
    teacher_forwards = []
    teacher.get_input_embeddings().register_forward_pre_hook(lambda module, args: teacher_forwards.append(args[0].shape))
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    cached, uncached = (
        sample(student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS,
               generator=torch.Generator().manual_seed(4), teacher=teacher, teacher_mix=0.0, use_cache=use_cache)
        for use_cache in (True, False)
    )
    assert teacher_forwards[0] == (len(PROMPTS), prompt_ids.shape[1] + cached.response_ids.shape[1])
    assert len(teacher_forwards) == 1 + cached.response_ids.shape[1]  # the cached path's one, the uncached path's
    assert torch.equal(cached.response_ids, uncached.response_ids)
    torch.testing.assert_close(cached.student_logprobs, uncached.student_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.teacher_logprobs, uncached.teacher_logprobs, atol=1e-4, rtol=0)
    real = cached.response_mask.bool()
    assert (cached.teacher_logprobs[~real] == 0).all() and (cached.teacher_logprobs[real] < 0).all()
    torch.testing.assert_close(cached.teacher_hidden[real], uncached.teacher_hidden[real], atol=1e-4, rtol=1e-4)
    rescored = teacher_forced_logprobs(teacher, cached) * cached.response_mask
    torch.testing.assert_close(cached.teacher_logprobs, rescored, atol=1e-4, rtol=0)


def test_cached_path_feeds_the_prompt_once_then_one_token_per_step() -> None:
    student, teacher = tiny_gpt2(seed=1, eos_bias=2.0), tiny_gpt2(seed=2, eos_bias=2.0)
    fed_lengths = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        # Every forward, through transformers or GPT2Decoder, starts by embedding the tokens it is fed.
        model.transformer.wte.register_forward_pre_hook(
            lambda module, args, name=name: fed_lengths[name].append(args[0].shape[1])
        )
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(3), teacher=teacher, teacher_mix=0.2,
    )
    steps = rollout.response_ids.shape[1]
    expected = [prompt_ids.shape[1]] + [1] * (steps - 1)
    assert fed_lengths == {"student": expected, "teacher": expected}


def test_logprobs_match_teacher_forced_rescoring() -> None:
    student, teacher = tiny_gpt2(seed=1, eos_bias=1.5), tiny_gpt2(seed=2, eos_bias=1.5)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=16, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(11), teacher=teacher, teacher_mix=0.2,
    )
    generated = rollout.response_mask.bool()
    assert rollout.student_logprobs.dtype == torch.float32
    for model, logprobs in ((student, rollout.student_logprobs), (teacher, rollout.teacher_logprobs)):
        reference = teacher_forced_logprobs(model, rollout)
        torch.testing.assert_close(logprobs[generated], reference[generated], atol=1e-4, rtol=0)
        assert torch.all(logprobs[~generated] == 0)
    # The teacher hidden states kept for the update are the LM head's inputs that produced those log-probs.
    head_logprobs = torch.log_softmax(teacher.lm_head(rollout.teacher_hidden).float(), -1)
    head_logprobs = head_logprobs.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(head_logprobs[generated], rollout.teacher_logprobs[generated], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_prompts_samples() -> None:
    student = tiny_gpt2(seed=1, eos_bias=1.0)
    prompt = [8, 9, 10, 11]
    # Sanity: this model's outputs depend on positions, so a sampler ignoring padding would fail below.
    with torch.no_grad():
        padded_without_positions = student(
            torch.tensor([[EOS] * 3 + prompt]), attention_mask=torch.tensor([[0] * 3 + [1] * 4])
        ).logits[0, -1]
        unpadded = student(torch.tensor([prompt])).logits[0, -1]
    assert (padded_without_positions - unpadded).abs().max() > 1e-2

    rollouts = []
    for pads in (0, 3, 9):
        prompt_ids = torch.tensor([[EOS] * pads + prompt])
        prompt_mask = torch.tensor([[0] * pads + [1] * len(prompt)])
        rollouts.append(
            sample(
                student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS,
                generator=torch.Generator().manual_seed(5),
            )
        )
    for padded in rollouts[1:]:
        assert torch.equal(padded.response_ids, rollouts[0].response_ids)
        torch.testing.assert_close(padded.student_logprobs, rollouts[0].student_logprobs, atol=1e-4, rtol=0)


def test_padded_batch_rows_score_like_each_row_alone() -> None:
    student = tiny_gpt2(seed=1, eos_bias=1.0)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(9),
    )
    for row, prompt in enumerate(PROMPTS):
        length = int(rollout.response_mask[row].sum())
        response = rollout.response_ids[row, :length].tolist()
        with torch.no_grad():  # the row alone: no padding, no mask, default positions
            logits = student(torch.tensor([prompt + response])).logits[0].float()
        alone = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(-1, torch.tensor(response)[:, None])
        torch.testing.assert_close(rollout.student_logprobs[row, :length], alone.squeeze(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed, temperature", [(0, 1.0), (1, 1.0), (2, 0.7)])
def test_pure_sampling_equals_transformers_generate(seed: int, temperature: float) -> None:
    model = tiny_gpt2(seed=4, eos_bias=1.5)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    max_new_tokens = 25
    torch.manual_seed(seed)
    reference = model.generate(
        prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
        max_new_tokens=max_new_tokens, pad_token_id=EOS, eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    rollout = sample(
        model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=EOS,
        generator=None, temperature=temperature,
    )
    # Some row ended while others went on, so the draws made for finished rows are exercised too.
    assert (rollout.response_mask.sum(1) < rollout.response_ids.shape[1]).any()
    assert torch.equal(rollout.response_ids, reference[:, prompt_ids.shape[1] :])


@pytest.mark.parametrize("ngram_size, use_cache", [(1, True), (2, True), (2, False), (3, True)])
def test_no_repeat_ngram_sampling_equals_transformers_generate(ngram_size: int, use_cache: bool) -> None:
    model = tiny_gpt2(seed=4, eos_bias=-2.0)  # long responses, so that blocking bites
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    torch.manual_seed(3)
    reference = model.generate(
        prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=30,
        no_repeat_ngram_size=ngram_size, pad_token_id=EOS, eos_token_id=EOS,
    )
    torch.manual_seed(3)
    rollout = sample(model, prompt_ids, prompt_mask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=EOS,
                     generator=None, no_repeat_ngram_size=ngram_size, use_cache=use_cache)
    assert torch.equal(rollout.response_ids, reference[:, prompt_ids.shape[1] :])
    torch.manual_seed(3)
    unblocked = sample(model, prompt_ids, prompt_mask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=EOS,
                       generator=None, use_cache=use_cache)
    if ngram_size <= 2:  # 3-grams rarely repeat within 30 tokens of a 50-token vocabulary
        assert not torch.equal(unblocked.response_ids, rollout.response_ids)  # the blocking changed something
    width = prompt_ids.shape[1]
    for row in torch.cat([prompt_ids, rollout.response_ids], 1)[rollout.response_mask.sum(1) == 30].tolist():
        # No sampled token completes an n-gram that the row (prompt and its padding included) already held.
        for end in range(width, len(row)):
            ngram = tuple(row[end - ngram_size + 1 : end + 1])
            earlier = {tuple(row[i : i + ngram_size]) for i in range(end - ngram_size + 1)}
            assert ngram not in earlier


def test_banned_ngram_tokens_by_hand() -> None:
    from pipeline.generation import banned_by_ngram_repeat

    sequence = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 5]])
    banned = banned_by_ngram_repeat(sequence, 3, 6)
    # Row 0 ends in (1, 2), which was followed by 3 once: 3 is banned. Row 1 ends in (4, 5): never seen before.
    assert banned[0].nonzero().flatten().tolist() == [3] and not banned[1].any()
    assert banned_by_ngram_repeat(sequence, 1, 6)[1].nonzero().flatten().tolist() == [4, 5]  # unigrams: all seen
    assert not banned_by_ngram_repeat(sequence, 6, 6).any()  # shorter than one n-gram


def test_rows_end_at_eos_and_the_loop_stops_when_all_have() -> None:
    student, teacher = tiny_gpt2(seed=1, eos_bias=2.5), tiny_gpt2(seed=2, eos_bias=2.5)
    pad = 49  # distinct from EOS so the layout after each row's end is visible
    prompts = PROMPTS * 2
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    max_new_tokens = 40
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=pad,
        generator=torch.Generator().manual_seed(2), teacher=teacher, teacher_mix=0.5,
    )
    steps = rollout.response_ids.shape[1]
    ends = []
    for row in range(len(prompts)):
        ids = rollout.response_ids[row].tolist()
        end = ids.index(EOS)
        ends.append(end)
        assert rollout.response_mask[row].tolist() == [1.0] * (end + 1) + [0.0] * (steps - end - 1)
        assert ids[end + 1 :] == [pad] * (steps - end - 1)
        assert torch.all(rollout.student_logprobs[row, end + 1 :] == 0)
        assert torch.all(rollout.teacher_logprobs[row, end + 1 :] == 0)
        assert not rollout.from_teacher[row, end + 1 :].any()
        assert rollout.student_logprobs[row, end] < 0  # the EOS itself is scored
    assert len(set(ends)) > 1  # rows ended at different steps
    assert steps == max(ends) + 1 < max_new_tokens


def test_rows_that_never_end_fill_max_new_tokens() -> None:
    student = tiny_gpt2(seed=1, eos_bias=-20.0)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.response_ids.shape == (len(PROMPTS), 6)
    assert torch.all(rollout.response_mask == 1.0)
    assert not (rollout.response_ids == EOS).any()


def test_seeded_generator_is_the_only_randomness() -> None:
    student, teacher = tiny_gpt2(seed=1), tiny_gpt2(seed=2)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)

    def draw(seed: int) -> Rollout:
        return sample(
            student, prompt_ids, prompt_mask, max_new_tokens=8, eos_token_id=EOS, pad_token_id=EOS,
            generator=torch.Generator().manual_seed(seed), teacher=teacher, teacher_mix=0.5,
        )

    global_state = torch.get_rng_state()
    first = draw(42)
    torch.manual_seed(999)  # moving the global RNG must not matter
    second = draw(42)
    assert torch.equal(first.response_ids, second.response_ids)
    assert torch.equal(first.from_teacher, second.from_teacher)
    assert not torch.equal(first.response_ids, draw(43).response_ids)
    torch.set_rng_state(global_state)
    draw(42)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_bf16_models_give_fp32_logprobs() -> None:
    student = tiny_gpt2(seed=1, eos_bias=1.0).to(torch.bfloat16)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=8, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(1),
    )
    assert rollout.student_logprobs.dtype == torch.float32
    generated = rollout.response_mask.bool()
    reference = teacher_forced_logprobs(student, rollout)
    # bf16 activations differ between incremental and full passes; only the scale of that noise is allowed.
    torch.testing.assert_close(rollout.student_logprobs[generated], reference[generated], atol=0.1, rtol=0)


def test_teacher_mix_without_teacher_is_rejected() -> None:
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    with pytest.raises(ValueError, match="teacher"):
        sample(
            tiny_gpt2(seed=1), prompt_ids, prompt_mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS,
            generator=None, teacher_mix=0.2,
        )


def test_right_padded_prompts_are_rejected() -> None:
    prompt_ids = torch.tensor([[5, 6, 7], [8, EOS, EOS]])
    prompt_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample(
            tiny_gpt2(seed=1), prompt_ids, prompt_mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS,
            generator=None,
        )


def test_left_pad_hand_example() -> None:
    ids, mask = left_pad([[1, 2, 3], [4], [5, 6]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": EOS, **{f"w{i}": i for i in range(1, VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_decode_responses_cuts_at_first_eos() -> None:
    response_ids = torch.tensor([[5, 9, EOS, 7, 7], [3, 4, 5, 6, 8], [EOS, 2, 2, 2, 2]])
    rollout = Rollout(
        prompt_ids=torch.tensor([[1], [1], [1]]),
        prompt_mask=torch.ones(3, 1, dtype=torch.long),
        response_ids=response_ids,
        response_mask=torch.ones(3, 5),
        student_logprobs=torch.zeros(3, 5),
        teacher_logprobs=None,
        teacher_hidden=None,
        from_teacher=torch.zeros(3, 5, dtype=torch.bool),
    )
    assert decode_responses(word_tokenizer(), rollout) == ["w5 w9", "w3 w4 w5 w6 w8", ""]


def test_decode_sampled_rollout_keeps_exactly_the_tokens_before_eos() -> None:
    student = tiny_gpt2(seed=1, eos_bias=2.0)
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(
        student, prompt_ids, prompt_mask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=EOS,
        generator=torch.Generator().manual_seed(4),
    )
    texts = decode_responses(word_tokenizer(), rollout)
    for row, text in enumerate(texts):
        words_before_eos = int(rollout.response_mask[row].sum()) - 1  # every row here ended with EOS
        assert len(text.split()) == words_before_eos
        assert "<eos>" not in text


def test_evaluation_cuts_a_long_prompt_to_its_first_tokens_as_the_official_code() -> None:
    """data.long_eval_prompts: truncate keeps prompt_ids[:max_prompt_length] (LMOps PromptDataset: data[:prompt_length]),
    so the response is the one sampled after the first tokens, not the last ones."""
    from pipeline.evaluation import generate_responses

    tokenizer = word_tokenizer()
    tokenizer.pad_token = "<eos>"
    model = tiny_gpt2(seed=4, eos_bias=1.5)
    prompt = " ".join(f"w{i}" for i in range(10, 20))  # 10 tokens
    responses, _ = generate_responses(model, tokenizer, [prompt], seed=3, max_new_tokens=12, batch_size=1,
                                      max_prompt_tokens=4)
    first_four = torch.tensor([[10, 11, 12, 13]])
    expected = sample(model, first_four, torch.ones_like(first_four), max_new_tokens=12, eos_token_id=EOS,
                      pad_token_id=EOS, generator=torch.Generator().manual_seed(3))
    assert responses == decode_responses(tokenizer, expected)
    whole, _ = generate_responses(model, tokenizer, [prompt], seed=3, max_new_tokens=12, batch_size=1)
    assert whole != responses  # the cut changed the conditioning


def test_sampling_builds_no_autograd_graph() -> None:
    """sample runs under no_grad (a graph over every decoding step would hold each step's activations): what it
    returns carries no gradient even from a model whose parameters require one."""
    model = tiny_gpt2(seed=1)
    assert all(p.requires_grad for p in model.parameters())
    prompt_ids, prompt_mask = left_pad(PROMPTS, EOS)
    rollout = sample(model, prompt_ids, prompt_mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(0), teacher=tiny_gpt2(seed=2), teacher_mix=0.5)
    assert not rollout.student_logprobs.requires_grad and not rollout.teacher_logprobs.requires_grad
