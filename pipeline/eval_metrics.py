"""Measurements beyond Rouge-L (spec §5, "further measurements"): length buckets, diversity, calibration,
exposure bias. The evaluate stage computes them next to Rouge-L; the report turns them into tables and plots.

Rouge-L by gold-response length. The paper's length analysis splits the test examples by the number of words
of the gold response: [0, 5], [6, 10], [11, inf) (the last is the bucket S-NI and UnNI are restricted to).

Diversity. Response length is the mean number of whitespace words of the responses; distinct-n is the number of
distinct word n-grams divided by the number of n-grams over all responses of one sampling seed (Li et al. 2016;
the paper reports Dist-4), words lower-cased.

Calibration (ECE). Teacher-forced on the gold response (prompt, then response + EOS, tokenized as in training):
at every response position the confidence is the model's largest next-token probability and the prediction is
correct when that token is the gold one. Confidences fall in M equal-width bins ((m-1)/M, m/M] (a confidence of 0
goes to the first bin), and ECE = sum_m |B_m|/N * |accuracy(B_m) - mean confidence(B_m)| (Guo et al. 2017), in [0, 1].

Exposure bias (ExAccErr, the paper following Arora et al. 2022), with p the teacher and q the student:
    R(l)    = sum_{t<=l} E_{y<t ~ q} sum_v p(v|y<t,x) log p(v|y<t,x) / q(v|y<t,x)   (student-generated prefixes)
    l eps(l) = sum_{t<=l} E_{y<t ~ p} sum_v p(v|y<t,x) log p(v|y<t,x) / q(v|y<t,x)  (teacher-generated prefixes)
    ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) x 100%
The inner sum is the exact forward KL(p || q) over the vocabulary at one position. Expectations are Monte Carlo
over one sampled response per prompt; a response that has ended (after its EOS) adds no further error, as in the
official code, so the per-position error is the sum over prompts of the KL at positions still generating,
divided by the number of prompts. The official exposure-bias script's KL sums skip the first response position
(t = 1, whose prefix is the prompt alone and the same under both generators); `skip_first_position` offers that
alignment. The report uses the paper's (every position), evaluate.exposure_bias_skip_first: false.
"""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from pipeline.data import TokenizedSplit, build_prompt, sft_batch, tokenize_example
from pipeline.evaluation import generate_responses, score_records
from pipeline.generation import left_pad, sample
from pipeline.losses import forward_kl

# Gold-response word counts of the paper's length analysis: (first, last) words, last None = no upper bound.
LENGTH_BUCKETS: tuple[tuple[int, int | None], ...] = ((0, 5), (6, 10), (11, None))
DISTINCT_N: tuple[int, ...] = (1, 2, 4)
ECE_BINS = 10
# Exposure bias is the expensive one (two models sample and both score both sets of samples): one evaluation set,
# the first prompts of it, the first sampling seed.
EXPOSURE_BIAS_SET = "dollyeval"
EXPOSURE_BIAS_PROMPTS = 100
EXPOSURE_BIAS_REPORTED_LENGTHS = (8, 16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------------ length buckets


def bucket_name(first: int, last: int | None) -> str:
    return f"{first}-{last}" if last is not None else f"{first}-inf"  # MLflow keys allow no "+"


def length_bucket(words: int) -> str:
    for first, last in LENGTH_BUCKETS:
        if words >= first and (last is None or words <= last):
            return bucket_name(first, last)
    raise ValueError(f"negative word count {words}")


def rouge_by_length(gold_responses: list[str], scores: list[float]) -> dict[str, dict[str, float]]:
    """{bucket: {"rouge_l": mean score, "count": examples}} for the non-empty buckets, in bucket order."""
    grouped: dict[str, list[float]] = {bucket_name(first, last): [] for first, last in LENGTH_BUCKETS}
    for response, score in zip(gold_responses, scores, strict=True):
        grouped[length_bucket(len(response.split()))].append(score)
    return {name: {"rouge_l": sum(values) / len(values), "count": len(values)} for name, values in grouped.items() if values}


# --------------------------------------------------------------------------------------- length, diversity


def mean_words(texts: list[str]) -> float:
    return sum(len(text.split()) for text in texts) / len(texts) if texts else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over the texts; 0 when no text has n words."""
    total, distinct = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


# ------------------------------------------------------------------------------------------------ calibration


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    if confidences.numel() == 0:
        raise ValueError("ECE of an empty set of predictions")
    confidences = confidences.double()
    correct = correct.double()
    bins = (torch.ceil(confidences * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece = 0.0
    for index in range(n_bins):
        in_bin = bins == index
        count = int(in_bin.sum())
        if count:
            gap = correct[in_bin].mean() - confidences[in_bin].mean()
            ece += count / confidences.numel() * abs(float(gap))
    return ece


@torch.no_grad()
def gold_token_predictions(
    model, tokenizer, records: list[dict], *, max_length: int, max_prompt_length: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) at every gold response position (response tokens and the EOS), teacher-forced."""
    examples = []
    for record in records:
        prompt = build_prompt(record["instruction"], record["context"])
        example = tokenize_example(tokenizer, prompt, record["response"], max_length, max_prompt_length)
        if example is not None:
            examples.append(example)
    split = TokenizedSplit.from_examples(examples)
    model.eval()
    device = next(model.parameters()).device
    confidences, correct = [], []
    for start in range(0, len(split), batch_size):
        batch = sft_batch(split, range(start, min(start + batch_size, len(split))), tokenizer.pad_token_id)
        # Right padding: every row's real tokens start at column 0, so the default position ids are right.
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        mask = labels != -100
        # Only response positions, a chunk at a time: fp32 [B, T, V] probabilities of a 50K vocabulary need GBs.
        for position_logits, position_labels in zip(logits[:, :-1][mask].split(1024), labels[mask].split(1024)):
            top_logit, top_token = position_logits.max(dim=-1)
            confidences.append((top_logit.float() - position_logits.float().logsumexp(dim=-1)).exp().cpu())
            correct.append((top_token == position_labels).cpu())
    return torch.cat(confidences), torch.cat(correct)


# ---------------------------------------------------------------------------------------------- exposure bias


@torch.no_grad()
def position_kl_sums(student, teacher, rollout) -> torch.Tensor:
    """[R]: at each response position t, sum over rows of KL(p || q) at the distribution that drew y_t (0 for rows
    that had ended). Both models score the same prompt + response, with the sampler's left-padded position ids."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask.long(), rollout.response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_width, response_width = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    # The logits at column c predict the token at column c + 1: the first response token is predicted at P - 1.
    columns = slice(prompt_width - 1, prompt_width - 1 + response_width)
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, columns]
    teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, columns]
    return torch.stack([
        forward_kl(student_logits[:, t : t + 1], teacher_logits[:, t : t + 1], rollout.response_mask[:, t : t + 1], reduction="sum")
        for t in range(response_width)
    ])


@torch.no_grad()
def accumulated_error(
    generator_model, student, teacher, tokenizer, prompts: list[str], *, seed: int, max_new_tokens: int,
    batch_size: int, no_repeat_ngram_size: int = 0, skip_first_position: bool = False,
    max_prompt_tokens: int | None = None, progress: str | None = None,
) -> list[float]:
    """sum_{t<=l} E_{y<t ~ generator} KL(p || q)(y<t), for l = 1..max_new_tokens (the generator is q for R(l),
    p for l eps(l))."""
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    per_position = torch.zeros(max_new_tokens, dtype=torch.float64)
    encoded = [tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt_tokens] for prompt in prompts]
    for start in tqdm(range(0, len(encoded), batch_size), desc=progress, disable=progress is None, leave=False):
        prompt_ids, prompt_mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
        rollout = sample(
            generator_model, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        sums = position_kl_sums(student, teacher, rollout).double().cpu()
        per_position[: len(sums)] += sums
    if skip_first_position:
        per_position[0] = 0.0
    return (per_position / len(prompts)).cumsum(0).tolist()


def ex_acc_err(student_prefix_error: list[float], teacher_prefix_error: list[float]) -> list[float | None]:
    """ExAccErr(l) in percent from R(l) and l eps(l); None where l eps(l) = 0 (the student equals the teacher)."""
    return [100.0 * (r - e) / e if e > 0 else None for r, e in zip(student_prefix_error, teacher_prefix_error, strict=True)]


def exposure_bias(
    student, teacher, tokenizer, records: list[dict], *, seed: int, max_new_tokens: int, batch_size: int,
    no_repeat_ngram_size: int = 0, skip_first_position: bool = False, max_prompt_tokens: int | None = None,
    progress: str | None = None,
) -> dict:
    """R(l), l eps(l) and ExAccErr(l) for l = 1..max_new_tokens over the records' prompts, one sample per prompt."""
    student.eval()
    teacher.eval()
    prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
    kwargs = dict(seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, no_repeat_ngram_size=no_repeat_ngram_size,
                  skip_first_position=skip_first_position, max_prompt_tokens=max_prompt_tokens)
    student_prefix = accumulated_error(student, student, teacher, tokenizer, prompts, **kwargs,
                                       progress=progress and f"{progress} student prefixes")
    teacher_prefix = accumulated_error(teacher, student, teacher, tokenizer, prompts, **kwargs,
                                       progress=progress and f"{progress} teacher prefixes")
    curve = ex_acc_err(student_prefix, teacher_prefix)
    lengths = [l for l in EXPOSURE_BIAS_REPORTED_LENGTHS if l < max_new_tokens] + [max_new_tokens]
    return {
        "prompts": len(prompts),
        "seed": seed,
        "ex_acc_err_at": {str(l): curve[l - 1] for l in lengths},
        "curve": {"l": list(range(1, max_new_tokens + 1)), "student_prefix_error": student_prefix,
                  "teacher_prefix_error": teacher_prefix, "ex_acc_err": curve},
    }


def evaluate_set(model, tokenizer, records: list[dict], *, seeds: list[int], max_new_tokens: int, batch_size: int,
                 temperature: float, max_length: int, max_prompt_length: int, progress: str,
                 no_repeat_ngram_size: int = 0) -> tuple[dict, list[dict]]:
    """The evaluate stage's protocol on one evaluation set: a sample per prompt for every sampling seed, each
    prompt cut to its first max_prompt_length tokens (a no-op unless data.long_eval_prompts kept longer ones).
    -> the set's summary (Rouge-L per seed, their mean and std, then every measurement above) and the prediction
    rows (one per example and seed)."""
    prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
    rows, per_seed, by_length, words = [], {}, [], []
    distinct = {n: [] for n in DISTINCT_N}
    for seed in seeds:
        responses, _ = generate_responses(
            model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
            batch_size=batch_size, temperature=temperature, no_repeat_ngram_size=no_repeat_ngram_size,
            max_prompt_tokens=max_prompt_length, progress=f"{progress} seed {seed}",
        )
        scores = score_records(records, responses)
        per_seed[str(seed)] = statistics.fmean(scores)
        by_length.append(rouge_by_length([r["response"] for r in records], scores))
        words.append(mean_words(responses))
        for n in DISTINCT_N:
            distinct[n].append(distinct_n(responses, n))
        rows += [{"seed": seed, "instruction": r["instruction"], "context": r["context"], "response": text,
                  "references": r["references"], "rouge_l": score}
                 for r, text, score in zip(records, responses, scores)]
    confidences, correct = gold_token_predictions(
        model, tokenizer, records, max_length=max_length,
        max_prompt_length=max_prompt_length, batch_size=batch_size,
    )
    values = list(per_seed.values())
    summary = {
        "rouge_l": statistics.fmean(values),
        "rouge_l_std": statistics.pstdev(values),
        "per_seed": per_seed,
        # Buckets hold the same examples for every seed: average the per-seed bucket means.
        "rouge_l_by_length": {
            bucket: {"rouge_l": statistics.fmean(seed_buckets[bucket]["rouge_l"] for seed_buckets in by_length),
                     "count": by_length[0][bucket]["count"]}
            for bucket in by_length[0]
        },
        "response_words": statistics.fmean(words),
        **{f"distinct_{n}": statistics.fmean(distinct[n]) for n in DISTINCT_N},
        "ece": expected_calibration_error(confidences, correct),
        "token_accuracy": float(correct.float().mean()),
    }
    return summary, rows
