"""Evaluation metrics beyond Rouge-L against independent truths: hand-computed values, per-sequence brute force,
and exact enumeration of every response for the Monte Carlo exposure-bias estimate."""

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.data import build_prompt, train_bpe_tokenizer
from pipeline.eval_metrics import (
    accumulated_error,
    distinct_n,
    ex_acc_err,
    expected_calibration_error,
    gold_token_predictions,
    length_bucket,
    mean_words,
    position_kl_sums,
    rouge_by_length,
)
from pipeline.generation import left_pad, sample


def tiny_gpt2(seed: int, vocab_size: int, initializer_range: float = 0.5) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=initializer_range)
    return GPT2LMHeadModel(config).eval()


def next_token_probs(model, ids: list[int]) -> list[float]:
    """One unpadded sequence, no masks, no position ids: the plainest possible forward pass."""
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).tolist()


def kl(p: list[float], q: list[float]) -> float:
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


# ------------------------------------------------------------------------------------- buckets and diversity


def test_length_bucket_edges():
    assert [length_bucket(n) for n in (0, 5, 6, 10, 11, 300)] == ["0-5", "0-5", "6-10", "6-10", "11-inf", "11-inf"]


def test_rouge_by_length_by_hand():
    gold = ["a b c", "a b c d e f", " ".join(["w"] * 11), "one two three four five"]
    scores = [10.0, 20.0, 30.0, 50.0]
    assert rouge_by_length(gold, scores) == {
        "0-5": {"rouge_l": 30.0, "count": 2},  # (10 + 50) / 2
        "6-10": {"rouge_l": 20.0, "count": 1},
        "11-inf": {"rouge_l": 30.0, "count": 1},
    }
    assert rouge_by_length(["a b"], [7.0]) == {"0-5": {"rouge_l": 7.0, "count": 1}}  # empty buckets left out


def test_distinct_n_and_length_by_hand():
    texts = ["The cat sat", "the CAT ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran out of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # "the cat" twice, "cat sat", "cat ran"
    assert distinct_n(texts, 4) == 0.0  # no text has 4 words
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert mean_words(texts + ["", "one"]) == pytest.approx((3 + 3 + 0 + 1) / 4)


# ------------------------------------------------------------------------------------------------ calibration


def test_ece_by_hand():
    confidences = torch.tensor([0.05, 0.15, 0.12, 0.95, 0.85, 0.55], dtype=torch.float64)
    correct = torch.tensor([0, 1, 0, 1, 0, 1])
    # Bins of width 0.1: (0, .1]: {.05 wrong}: gap .05; (.1, .2]: {.15 right, .12 wrong}: acc .5, conf .135, gap .365;
    # (.5, .6]: {.55 right}: gap .45; (.8, .9]: {.85 wrong}: gap .85; (.9, 1]: {.95 right}: gap .05.
    expected = (1 * 0.05 + 2 * 0.365 + 1 * 0.45 + 1 * 0.85 + 1 * 0.05) / 6
    assert expected_calibration_error(confidences, correct) == pytest.approx(expected)
    # Two bins: (0, .5] holds 0.5 itself (right-closed bins), (.5, 1] holds 0.75 and 1.0.
    confidences = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
    assert expected_calibration_error(confidences, torch.tensor([1, 1, 0]), n_bins=2) == pytest.approx(
        (1 * 0.5 + 2 * abs(0.5 - 0.875)) / 3
    )


def test_ece_is_zero_when_accuracy_matches_confidence():
    confidences = torch.full((8,), 0.75, dtype=torch.float64)
    assert expected_calibration_error(confidences, torch.tensor([1, 1, 1, 0, 1, 1, 1, 0])) == pytest.approx(0.0)


def test_gold_token_predictions_match_per_example_brute_force():
    records = [
        {"instruction": "Name a colour.", "context": "", "response": "Red is a colour."},
        {"instruction": "Who lives in Pell?", "context": "Hugo lives in Pell.", "response": "Hugo."},
        {"instruction": "Say hello.", "context": "", "response": "Hello there, friend."},
    ]
    texts = [build_prompt(r["instruction"], r["context"]) + r["response"] for r in records] * 5
    tokenizer = train_bpe_tokenizer(texts, 300)
    model = tiny_gpt2(0, len(tokenizer), initializer_range=0.2)
    confidences, correct = gold_token_predictions(model, tokenizer, records, max_length=256, max_prompt_length=200, batch_size=2)

    expected_confidences, expected_correct = [], []
    for record in records:
        prompt = build_prompt(record["instruction"], record["context"])
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full = tokenizer.encode(prompt + record["response"], add_special_tokens=False) + [tokenizer.eos_token_id]
        for position in range(len(prompt_ids), len(full)):
            probs = next_token_probs(model, full[:position])
            best = max(range(len(probs)), key=probs.__getitem__)
            expected_confidences.append(probs[best])
            expected_correct.append(best == full[position])
    assert confidences.tolist() == pytest.approx(expected_confidences, abs=1e-5)
    assert correct.tolist() == expected_correct


# ---------------------------------------------------------------------------------------------- exposure bias


def test_ex_acc_err_by_hand():
    assert ex_acc_err([2.0, 6.0, 3.0], [1.0, 4.0, 3.0]) == [100.0, 50.0, 0.0]
    assert ex_acc_err([0.0], [0.0]) == [None]


def test_position_kl_sums_match_unpadded_sequences():
    """Left-padded prompts of different lengths, rows ending at different steps: each row scored alone agrees."""
    vocab = 6
    student, teacher = tiny_gpt2(1, vocab), tiny_gpt2(2, vocab)
    prompts = [[3], [1, 2, 4, 5], [2, 2]]
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id=0)
    rollout = sample(student, prompt_ids, prompt_mask, max_new_tokens=6, eos_token_id=0, pad_token_id=0,
                     generator=torch.Generator().manual_seed(3))
    sums = position_kl_sums(student, teacher, rollout)

    expected = [0.0] * rollout.response_ids.shape[1]
    for row, prompt in enumerate(prompts):
        response = rollout.response_ids[row].tolist()
        for t in range(len(response)):
            if rollout.response_mask[row, t] > 0:
                prefix = prompt + response[:t]
                expected[t] += kl(next_token_probs(teacher, prefix), next_token_probs(student, prefix))
    assert rollout.response_mask.sum(1).unique().numel() > 1, "rows should end at different steps"
    assert sums.tolist() == pytest.approx(expected, abs=1e-5)


class PromptTokenizer:
    """Every prompt is the token sequence [1, 2]; token 0 is EOS and padding."""

    eos_token_id = 0
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1, 2]


def exact_accumulated_error(generator_model, student, teacher, prompt, max_new_tokens, vocab):
    """E[X_l] and Var[X_l] of the per-prompt accumulated error X_l = sum_{t <= min(l, T)} KL_t by enumerating every
    response the generator can produce (T: the response length; a response stops at EOS or max_new_tokens)."""
    mean = [0.0] * max_new_tokens
    second_moment = [0.0] * max_new_tokens

    def walk(response: list[int], probability: float, accumulated: list[float]) -> None:
        prefix = prompt + response
        step_kl = kl(next_token_probs(teacher, prefix), next_token_probs(student, prefix))
        accumulated = accumulated + [(accumulated[-1] if accumulated else 0.0) + step_kl]
        generator_probs = next_token_probs(generator_model, prefix)
        for token in range(vocab):
            token_probability = probability * generator_probs[token]
            if token == 0 or len(accumulated) == max_new_tokens:
                padded = accumulated + [accumulated[-1]] * (max_new_tokens - len(accumulated))
                for l in range(max_new_tokens):
                    mean[l] += token_probability * padded[l]
                    second_moment[l] += token_probability * padded[l] ** 2
            else:
                walk(response + [token], token_probability, accumulated)

    walk([], 1.0, [])
    return mean, [max(s - m * m, 0.0) for s, m in zip(second_moment, mean)]  # max: rounding when X_l is constant


@pytest.mark.parametrize("generator_is_student", [True, False])
def test_accumulated_error_matches_exact_enumeration(generator_is_student):
    vocab, max_new_tokens, n_prompts = 3, 3, 3000
    student, teacher = tiny_gpt2(4, vocab), tiny_gpt2(5, vocab)
    generator_model = student if generator_is_student else teacher
    estimate = accumulated_error(generator_model, student, teacher, PromptTokenizer(), ["x"] * n_prompts,
                                 seed=7, max_new_tokens=max_new_tokens, batch_size=1000)
    mean, variance = exact_accumulated_error(generator_model, student, teacher, [1, 2], max_new_tokens, vocab)
    assert mean[0] > 0.01 and mean[-1] > mean[0], "the models should disagree, and the error accumulate"
    for l in range(max_new_tokens):
        # The estimate is a mean of n_prompts independent draws of X_l: within 4.5 standard errors of E[X_l]
        # (plus fp32 rounding: X_1 is the same for every draw, its variance 0).
        assert abs(estimate[l] - mean[l]) < 4.5 * math.sqrt(variance[l] / n_prompts) + 1e-5, (l, estimate, mean)


def test_exposure_bias_sampling_blocks_repeated_ngrams_when_asked():
    """Unigram blocking after the prompt [1, 2] in a 3-token vocabulary leaves only EOS (0): every response is one
    token long, so the accumulated error stops growing after l = 1 and X_1 is the first position's exact KL."""
    vocab, max_new_tokens = 3, 3
    student, teacher = tiny_gpt2(4, vocab), tiny_gpt2(5, vocab)
    kwargs = dict(seed=7, max_new_tokens=max_new_tokens, batch_size=100)
    blocked = accumulated_error(student, student, teacher, PromptTokenizer(), ["x"] * 100, **kwargs,
                                no_repeat_ngram_size=1)
    free = accumulated_error(student, student, teacher, PromptTokenizer(), ["x"] * 100, **kwargs)
    first = kl(next_token_probs(teacher, [1, 2]), next_token_probs(student, [1, 2]))
    assert blocked == pytest.approx([first] * max_new_tokens, abs=1e-5)
    assert free[-1] > free[0] + 1e-3
    # The official alignment drops position 1 from the sums: the same samples, every R(l) less X_1.
    skipped = accumulated_error(student, student, teacher, PromptTokenizer(), ["x"] * 100, **kwargs,
                                skip_first_position=True)
    assert skipped == pytest.approx([value - free[0] for value in free], abs=1e-6) and skipped[0] == 0


# ----------------------------------------------------------------------------------- evaluation sets from files


def test_eval_set_records_read_both_formats_and_filter_short_gold(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.data import eval_set_records, read_jsonl

    eleven = "one two three four five six seven eight nine ten eleven"
    path = tmp_path / "sni.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "A", "input": "ctx", "output": eleven},                           # MiniLLM, kept
        {"instruction": "B", "input": "", "output": ["too short", eleven + " twelve"]},   # the short one is dropped
        {"instruction": "C", "output": "ten words " * 5},                                 # 10 words: dropped
        {"instruction": "D", "context": "", "response": eleven, "category": "qa"},        # Dolly, kept
    ]) + "\n")
    records, dropped = eval_set_records(read_jsonl(path), "sni", str(path))
    assert dropped == 1
    assert [r["instruction"] for r in records] == ["A", "B", "D"]
    assert records[0] == {"instruction": "A", "context": "ctx", "response": eleven, "category": "sni", "references": [eleven]}
    assert records[1]["references"] == [eleven + " twelve"] and records[1]["response"] == eleven + " twelve"
    assert records[2]["category"] == "qa"
    # Other sets have no length filter, and keep every output as a reference.
    records, dropped = eval_set_records([{"instruction": "B", "output": ["too short", "fine"]}], "selfinst", "x")
    assert (records[0]["references"], dropped) == (["too short", "fine"], 0)
    with pytest.raises(ConfigError, match=r"x: record 1: needs 'response'"):
        eval_set_records([{"instruction": "B", "answer": "?"}], "vicunaeval", "x")
    with pytest.raises(ConfigError, match=r"x: record 2: .* must be strings"):
        eval_set_records([{"instruction": "B", "output": "ok"}, {"instruction": 3, "output": "ok"}], "vicunaeval", "x")
