"""KV-cached ancestral sampling for evaluation, SeqKD data and MiniLLM rollouts (spec §1, §4, §5).

One sampler serves every caller: a model alone (evaluation, SeqKD teacher outputs) or a student mixed
with a teacher (MiniLLM rollouts).

Teacher-mixed sampling as a two-stage draw. MiniLLM draws every token from p~ = a*p + (1-a)*q (p the
teacher, q the student). Per row and step we first draw the source, teacher with probability a, then the
token from that model's distribution. By the law of total probability the token's marginal is
a*p(y) + (1-a)*q(y) = p~(y), so there is no need to build p~, and the source itself (`from_teacher`) is
the share of teacher tokens that the trainer logs.

Left padding needs explicit position ids. Prompts of different lengths are left-padded so that every row's
next token sits in the last column. A model given no position ids numbers columns 0..L-1, so a row's real
tokens would start at position = its number of pads, and its samples would depend on its batch-mates.
Numbering each row's real tokens cumsum(mask) - 1 gives them the positions they would have unpadded; the
attention mask then hides the pads themselves.

KV caches. Without a cache, step t re-runs the whole prompt and the t tokens so far: O(L^2) token
forwards for L new tokens instead of O(L), paid twice in MiniLLM since teacher and student both run at
every step. Each model keeps its own cache, the prompt is run once, and each later step feeds one token.
Rows that ended keep emitting padding (outside the masks) until every row has ended; the loop then stops,
so the batch costs as many steps as its longest response, not `max_new_tokens`. Finished rows stay in the
batch, which keeps the random stream identical to transformers' own sampler (one multinomial per step over
the whole batch) and avoids re-slicing every cache layer whenever a row ends.
"""

from dataclasses import dataclass

import torch
from transformers import Cache


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompts as given
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] generated tokens, pad_token_id after the row's end; R <= max_new_tokens
    response_mask: torch.Tensor  # [B, R] float 1.0 on generated tokens INCLUDING the EOS that ended the row, 0 after
    student_logprobs: torch.Tensor  # [B, R] log q(y_t | y<t, x) at sampling time (q_old), 0 on padding
    teacher_logprobs: torch.Tensor | None  # [B, R] log p(y_t | ...) when a teacher was given, else None
    from_teacher: torch.Tensor  # [B, R] bool: this token was drawn from the teacher's component of the mixture


def _last_position_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None,
    use_cache: bool,
) -> tuple[torch.Tensor, Cache | None]:
    """fp32 logits of the last column, and the model's updated cache (None without caching)."""
    # logits_to_keep=1: the prompt pass would otherwise materialise B x P x V logits only to read one column.
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        logits_to_keep=1,
    )
    return output.logits[:, -1].float(), output.cache


def _token_logprobs(scaled_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return scaled_logits.gather(-1, tokens[:, None]).squeeze(-1) - scaled_logits.logsumexp(-1)


@torch.no_grad()
def sample(
    student: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    teacher: torch.nn.Module | None = None,
    teacher_mix: float = 0.0,
    temperature: float = 1.0,
    use_cache: bool = True,
) -> Rollout:
    """Sample one response per left-padded prompt, each token from teacher_mix*p + (1-teacher_mix)*q.

    The log-probs returned are those of the distributions the tokens were drawn from, softmax(logits /
    temperature); at temperature 1, as every caller in the spec uses, they are the models' own.
    use_cache=False recomputes the whole sequence at every step: the naive reference sampler, drawing
    the same random numbers in the same order as the cached path.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix}")
    if teacher_mix > 0.0 and teacher is None:
        raise ValueError("teacher_mix > 0 needs a teacher to mix in")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not bool(prompt_mask[:, -1].all()):
        # A pad in the last column means right padding or an empty prompt: the first token would be
        # sampled after a pad, not after the prompt.
        raise ValueError("prompts must be left-padded and non-empty (prompt_mask[:, -1] must be all 1)")

    batch_size = prompt_ids.shape[0]
    device = prompt_ids.device
    sequence_ids = prompt_ids
    attention_mask = prompt_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    ones_column = torch.ones(batch_size, 1, dtype=torch.long, device=device)
    student_cache = None
    teacher_cache = None
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)

    step_tokens, step_masks, step_student_logprobs, step_teacher_logprobs, step_from_teacher = [], [], [], [], []
    for step in range(max_new_tokens):
        # The cached path feeds only the newest token; the reference path feeds everything, every step.
        feed_last_only = use_cache and step > 0
        model_ids = sequence_ids[:, -1:] if feed_last_only else sequence_ids
        model_positions = position_ids[:, -1:] if feed_last_only else position_ids

        student_logits, student_cache = _last_position_logits(
            student, model_ids, attention_mask, model_positions, student_cache, use_cache
        )
        student_scaled = student_logits / temperature
        # softmax, not exp(log_softmax): bit-identical to transformers' sampler, so the draws match it.
        probs = torch.softmax(student_scaled, dim=-1)
        if teacher is not None:
            teacher_logits, teacher_cache = _last_position_logits(
                teacher, model_ids, attention_mask, model_positions, teacher_cache, use_cache
            )
            teacher_scaled = teacher_logits / temperature

        if teacher_mix > 0.0:
            from_teacher = torch.rand(batch_size, generator=generator, device=device) < teacher_mix
            probs = torch.where(from_teacher[:, None], torch.softmax(teacher_scaled, dim=-1), probs)
        else:
            from_teacher = torch.zeros(batch_size, dtype=torch.bool, device=device)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)

        active = ~finished
        tokens = torch.where(active, tokens, pad_token_id)
        step_tokens.append(tokens)
        step_masks.append(active.float())
        step_student_logprobs.append(torch.where(active, _token_logprobs(student_scaled, tokens), 0.0))
        if teacher is not None:
            step_teacher_logprobs.append(torch.where(active, _token_logprobs(teacher_scaled, tokens), 0.0))
        step_from_teacher.append(from_teacher & active)

        finished = finished | (tokens == eos_token_id)
        if bool(finished.all()):
            break
        sequence_ids = torch.cat([sequence_ids, tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, ones_column], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(step_tokens, dim=1),
        response_mask=torch.stack(step_masks, dim=1),
        student_logprobs=torch.stack(step_student_logprobs, dim=1),
        teacher_logprobs=torch.stack(step_teacher_logprobs, dim=1) if teacher is not None else None,
        from_teacher=torch.stack(step_from_teacher, dim=1),
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts as evaluation scores them: each row cut at its first EOS, special tokens dropped, stripped."""
    texts = []
    for token_ids in rollout.response_ids.tolist():
        if tokenizer.eos_token_id in token_ids:
            token_ids = token_ids[: token_ids.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(token_ids, skip_special_tokens=True).strip())
    return texts


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, P], mask [B, P]) with every sequence right-aligned, so each row's next token is the last column."""
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, longest - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, longest - len(sequence) :] = 1
    return ids, mask
