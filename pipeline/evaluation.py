"""Spec §5 evaluation: pure sampling (temperature 1, top-p 1, top-k 0), EOS cut, Rouge-L F x100 max over refs."""

from __future__ import annotations

import statistics

import torch
from rouge_score.rouge_scorer import RougeScorer
from tqdm import tqdm

from pipeline.data import build_prompt
from pipeline.generation import decode_responses, left_pad, sample

_SCORER = RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """Rouge-L F-measure x100 of Google's rouge-score with stemming, the max over the references."""
    return 100.0 * max(_SCORER.score(reference, prediction)["rougeL"].fmeasure for reference in references)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_prompt_tokens: int | None = None,
    progress: str | None = None,
) -> tuple[list[str], int]:
    """Sample one response per prompt: (the texts, in the prompts' order; the number of tokens sampled, each row's
    EOS included, which the cost ledger counts). Prompts are batched by length (less left padding).
    max_prompt_tokens keeps a prompt's first tokens only (the official evaluation's cut, data.long_eval_prompts)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt_tokens] for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    generated_tokens = 0
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        indices = order[start : start + batch_size]
        prompt_ids, prompt_mask = left_pad([encoded[i] for i in indices], tokenizer.pad_token_id)
        rollout = sample(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
            temperature=temperature,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        generated_tokens += int(rollout.response_mask.sum().item())
        for index, text in zip(indices, decode_responses(tokenizer, rollout)):
            responses[index] = text
    return responses, generated_tokens


def score_records(records: list[dict], responses: list[str]) -> list[float]:
    return [rouge_l(response, record["references"]) for record, response in zip(records, responses)]


def evaluate_rouge_l(model, tokenizer, records: list[dict], *, seed: int, max_new_tokens: int, batch_size: int) -> float:
    """Mean Rouge-L of one sampling seed: what training stages use to pick checkpoints on validation."""
    prompts = [build_prompt(r["instruction"], r["context"]) for r in records]
    responses, _ = generate_responses(model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
    return statistics.fmean(score_records(records, responses))
