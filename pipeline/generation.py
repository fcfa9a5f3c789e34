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

Decoding without the framework. A tiny model's one-token forward through transformers spends most of its time
outside arithmetic: a growing DynamicCache, a fresh 4-D causal mask per call and per model, and output
dataclasses (benchmarks/bench_rollouts.py measures it). `GPT2Decoder` (GPT-2) and `LlamaDecoder` (Llama and
Qwen2) run the same weights on a preallocated KV cache, with one visibility mask built per `sample` call and
shared by both models. Other architectures (OPT among them), and models in training mode (dropout), go through
the model's own forward with a transformers cache.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Cache, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from pipeline.engine import any_rank, partitioned
from pipeline.hidden_states import FUSED_CHUNK, response_hidden, unwrapped, with_lm_head
from pipeline.models import has_adapters


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompts as given
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] generated tokens, pad_token_id after the row's end; R <= max_new_tokens
    response_mask: torch.Tensor  # [B, R] float 1.0 on generated tokens INCLUDING the EOS that ended the row, 0 after
    student_logprobs: torch.Tensor  # [B, R] log q(y_t | y<t, x) at sampling time (q_old), 0 on padding
    teacher_logprobs: torch.Tensor | None  # [B, R] log p(y_t | ...) when a teacher was given, else None
    # [B, R, d] the teacher's last hidden state (its LM head's input) that scored each y_t, in the teacher's dtype.
    # The teacher is frozen, so the MiniLLM update reuses it rather than running the teacher again.
    teacher_hidden: torch.Tensor | None
    from_teacher: torch.Tensor  # [B, R] bool: this token was drawn from the teacher's component of the mixture


def _last_position(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None,
    use_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor, Cache | None]:
    """fp32 logits and last hidden state of the last column, and the model's updated cache (None without caching)."""
    # logits_to_keep=1: the prompt pass would otherwise materialise B x P x V logits only to read one column.
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    return output.logits[:, -1].float(), output.hidden_states[-1][:, -1], output.cache


class GPT2Decoder:
    """Eval-mode incremental forward of a GPT2LMHeadModel on a preallocated KV cache.

    Computes what `model(input_ids, attention_mask, position_ids, cache=...)` computes for the last
    column, op for op (same weights, same sdpa attention, same scaling), minus dropout.
    """

    def __init__(self, model: GPT2LMHeadModel, batch_size: int, max_length: int):
        config = model.config
        self.model = model
        self.heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        weight = model.lm_head.weight
        shape = (config.n_layer, batch_size, self.heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.length = 0
        # Plain tensors, looked up once: nn.Module attribute access costs more than a tiny model's arithmetic.
        # Conv1D weights are [in, out]: addmm(bias, x, weight) is the module's own forward.
        transformer = model.transformer
        self.ln_f = (transformer.ln_f.weight, transformer.ln_f.bias, transformer.ln_f.eps)
        self.blocks = [
            ((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), (b.attn.c_attn.weight, b.attn.c_attn.bias), b.attn.scaling,
             (b.attn.c_proj.weight, b.attn.c_proj.bias), (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps),
             (b.mlp.c_fc.weight, b.mlp.c_fc.bias), b.mlp.act, (b.mlp.c_proj.weight, b.mlp.c_proj.bias))
            for b in transformer.h
        ]

    def last_position(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits [B, V] and the final-norm hidden state [B, d] of the last column after feeding ids [B, T] at
        positions [B, T]; visible [B, 1, T, length + T]."""
        transformer = self.model.transformer
        batch_size, width = ids.shape
        start, end = self.length, self.length + width
        x = transformer.wte(ids) + transformer.wpe(positions)
        channels = x.shape[-1]
        for layer, (ln_1, (qkv_w, qkv_b), scaling, (out_w, out_b), ln_2, (fc_w, fc_b), act, (mlp_w, mlp_b)) in enumerate(self.blocks):
            h = F.layer_norm(x, (channels,), *ln_1)
            qkv = torch.addmm(qkv_b, h.view(-1, channels), qkv_w).view(batch_size, width, 3, self.heads, self.head_dim)
            self.keys[layer, :, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            self.values[layer, :, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                qkv[:, :, 0].transpose(1, 2), self.keys[layer, :, :, :end], self.values[layer, :, :, :end],
                attn_mask=visible, scale=scaling,
            )
            attended = attended.transpose(1, 2).reshape(-1, channels)
            x = x + torch.addmm(out_b, attended, out_w).view_as(x)
            h = F.layer_norm(x, (channels,), *ln_2)
            h = act(torch.addmm(fc_b, h.view(-1, channels), fc_w))
            x = x + torch.addmm(mlp_b, h, mlp_w).view_as(x)
        self.length = end
        last = F.layer_norm(x[:, -1], (channels,), *self.ln_f)
        return self.model.lm_head(last).float(), last


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm op for op: normalised in fp32, scaled in the model's dtype.
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaDecoder:
    """Eval-mode incremental forward of a LlamaForCausalLM or Qwen2ForCausalLM (Llama with q/k/v biases) on a
    preallocated KV cache, as GPT2Decoder does for GPT-2: RMSNorm, rotary positions from the model's own rotary
    module (so any rope scaling it was configured with), grouped-query attention through sdpa, SwiGLU. The cache
    holds the key/value heads only; sdpa's enable_gqa shares each among its query heads."""

    def __init__(self, model, batch_size: int, max_length: int):
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = model.lm_head.weight
        shape = (config.num_hidden_layers, batch_size, self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.length = 0
        body = model.model
        self.norm = (body.norm.weight, body.norm.variance_epsilon)
        self.blocks = [
            ((b.input_layernorm.weight, b.input_layernorm.variance_epsilon),
             *((proj.weight, proj.bias) for proj in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                     b.self_attn.o_proj)), b.self_attn.scaling,
             (b.post_attention_layernorm.weight, b.post_attention_layernorm.variance_epsilon),
             *((proj.weight, proj.bias) for proj in (b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)), b.mlp.act_fn)
            for b in body.layers
        ]

    def last_position(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As GPT2Decoder.last_position."""
        body = self.model.model
        batch_size, width = ids.shape
        start, end = self.length, self.length + width
        x = body.embed_tokens(ids)
        cos, sin = (part[:, None] for part in body.rotary_emb(x, positions))  # [B, 1, T, head_dim]
        for layer, (norm_1, q, k, v, out, scaling, norm_2, gate, up, down, act) in enumerate(self.blocks):
            h = _rms_norm(x, *norm_1)
            query = F.linear(h, *q).view(batch_size, width, self.heads, self.head_dim).transpose(1, 2)
            key = F.linear(h, *k).view(batch_size, width, self.kv_heads, self.head_dim).transpose(1, 2)
            self.keys[layer, :, :, start:end] = key * cos + _rotate_half(key) * sin
            self.values[layer, :, :, start:end] = F.linear(h, *v).view(batch_size, width, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query * cos + _rotate_half(query) * sin, self.keys[layer, :, :, :end], self.values[layer, :, :, :end],
                attn_mask=visible, scale=scaling, enable_gqa=self.kv_heads != self.heads,
            )
            x = x + F.linear(attended.transpose(1, 2).reshape(batch_size, width, -1), *out)
            h = _rms_norm(x, *norm_2)
            x = x + F.linear(act(F.linear(h, *gate)) * F.linear(h, *up), *down)
        self.length = end
        last = _rms_norm(x[:, -1], *self.norm)
        return self.model.lm_head(last).float(), last


def fast_decoder(model: torch.nn.Module | None):
    """Our own decoder class for this model, or None for the model's own forward with a transformers cache.
    Training mode would need dropout; GPT-2's cross-attention encoder states, Qwen2's sliding window a windowed mask;
    LoRA layers their adapters, which our decoders' direct weight reads would skip; ZeRO-3 partitioned weights a
    gather around every layer, which only the model's own forward does."""
    if model is None or model.training or has_adapters(model) or partitioned(model):
        return None
    if isinstance(model, GPT2LMHeadModel) and not model.config.add_cross_attention:
        return GPT2Decoder
    if isinstance(model, LlamaForCausalLM) or (isinstance(model, Qwen2ForCausalLM) and not model.config.use_sliding_window):
        return LlamaDecoder
    return None


def _token_logprobs(scaled_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return scaled_logits.gather(-1, tokens[:, None]).squeeze(-1) - scaled_logits.logsumexp(-1)


def score_with_teacher(teacher: torch.nn.Module, rollout: Rollout, temperature: float) -> Rollout:
    """`rollout` with the teacher's log-probs of its tokens and the hidden states that scored them, from one forward
    of the teacher over [prompt; response] rather than one per sampled token: what sampling gives when the teacher
    only scores (teacher_mix 0). Its LM head runs FUSED_CHUNK positions at a time, so no [B, R, V] logits exist."""
    hidden = response_hidden(teacher, rollout, torch.arange(rollout.response_ids.shape[0]))
    tokens = rollout.response_ids

    def token_logprobs(head: torch.Tensor) -> torch.Tensor:
        chunks = []
        for start in range(0, tokens.shape[1], FUSED_CHUNK):
            chunk_hidden, chunk_tokens = hidden[:, start : start + FUSED_CHUNK], tokens[:, start : start + FUSED_CHUNK]
            logits = F.linear(chunk_hidden, head)
            scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # fp32 softmax
            chunks.append(scaled.gather(-1, chunk_tokens[..., None]).squeeze(-1) - scaled.logsumexp(-1))
        return torch.cat(chunks, dim=1)

    logprobs = with_lm_head(teacher, token_logprobs)
    return dataclasses.replace(rollout, teacher_logprobs=torch.where(rollout.response_mask.bool(), logprobs, 0.0),
                               teacher_hidden=hidden)


def banned_by_ngram_repeat(sequence_ids: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """[B, V] True where a token would complete an n-gram of `size` tokens that the row already holds, prompt and
    its padding included: transformers' `no_repeat_ngram_size` rule, which the official MiniLLM evaluation uses
    (size 6, LMOps issue #205)."""
    batch_size, length = sequence_ids.shape
    banned = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=sequence_ids.device)
    if length < size:
        return banned
    windows = sequence_ids.unfold(1, size, 1)  # [B, W, size]: every n-gram so far
    last_tokens = sequence_ids[:, length - size + 1 :]  # what the next token would follow
    repeats = (windows[:, :, :-1] == last_tokens[:, None, :]).all(-1)
    rows, starts = repeats.nonzero(as_tuple=True)
    banned[rows, windows[rows, starts, -1]] = True
    return banned


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
    no_repeat_ngram_size: int = 0,
    use_cache: bool = True,
) -> Rollout:
    """Sample one response per left-padded prompt, each token from teacher_mix*p + (1-teacher_mix)*q.

    The log-probs returned are those of the distributions the tokens were drawn from, softmax(logits /
    temperature); at temperature 1, as every caller in the spec uses, they are the models' own.
    use_cache=False recomputes the whole sequence at every step: the naive reference sampler, drawing
    the same random numbers in the same order as the cached path. no_repeat_ngram_size > 0 gives probability 0 to
    every token that would repeat an n-gram of that size (banned_by_ngram_repeat); the log-probs are then those of
    the blocked distributions, which are what the tokens were drawn from.

    With teacher_mix 0 the teacher only scores the student's tokens: on the cached path it then runs once over the
    finished responses (score_with_teacher) instead of once per token. On a CPU a tiny teacher's per-token
    forwards cost far more than their FLOPs (benchmarks/bench_trl.py, ours_opd); the scores are the same up to float
    rounding (tests/test_generation.py). The uncached reference path keeps scoring inside the loop.
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

    batch_size, prompt_length = prompt_ids.shape
    device = prompt_ids.device
    sequence_ids = prompt_ids
    attention_mask = prompt_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    ones_column = torch.ones(batch_size, 1, dtype=torch.long, device=device)
    student_cache = None
    teacher_cache = None
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    # Under ZeRO-3 every forward gathers weights from all ranks, so every rank must run as many as the others: a rank
    # whose rows have all ended keeps running the forwards (on pads, drawing no random numbers and recording nothing)
    # until every rank's rows have, and its rollout and generator end as they would have alone.
    lockstep = partitioned(student) or partitioned(teacher)
    done_here = False

    # The fused head takes a weight alone: a head with a bias (never in the pipeline's models) is scored in the loop.
    score_after = (teacher is not None and teacher_mix == 0.0 and use_cache and no_repeat_ngram_size == 0
                   and unwrapped(teacher).get_output_embeddings().bias is None)
    scoring_teacher, teacher = (teacher, None) if score_after else (None, teacher)  # `teacher`: the one in the loop

    student_decoder, teacher_decoder = fast_decoder(student), fast_decoder(teacher)
    if use_cache and student_decoder is not None and (teacher is None or teacher_decoder is not None):
        max_length = prompt_length + max_new_tokens
        student_cache = student_decoder(student, batch_size, max_length)
        teacher_cache = teacher_decoder(teacher, batch_size, max_length) if teacher is not None else None
        # Query i sees key j <= i unless j is a prompt pad; a pad query sees itself, so no softmax row is empty.
        index = torch.arange(max_length, device=device)
        real = torch.cat([prompt_mask.bool(), torch.ones(batch_size, max_new_tokens, dtype=torch.bool, device=device)], 1)
        causal = index[None, :] <= index[:, None]
        visible = ((real[:, None, :] & causal) | torch.eye(max_length, dtype=torch.bool, device=device))[:, None]

    step_tokens, step_masks, step_student_logprobs, step_from_teacher = [], [], [], []
    step_teacher_logprobs, step_teacher_hidden = [], []
    for step in range(max_new_tokens):
        # The cached path feeds only the newest token; the reference path feeds everything, every step.
        feed_last_only = use_cache and step > 0
        model_ids = sequence_ids[:, -1:] if feed_last_only else sequence_ids
        model_positions = position_ids[:, -1:] if feed_last_only else position_ids

        if isinstance(student_cache, (GPT2Decoder, LlamaDecoder)):
            end = prompt_length + step
            step_visible = visible[:, :, end - model_ids.shape[1] : end, :end]
            student_logits, _ = student_cache.last_position(model_ids, model_positions, step_visible)
            if teacher is not None:
                teacher_logits, teacher_hidden = teacher_cache.last_position(model_ids, model_positions, step_visible)
        else:
            student_logits, _, student_cache = _last_position(
                student, model_ids, attention_mask, model_positions, student_cache, use_cache
            )
            if teacher is not None:
                teacher_logits, teacher_hidden, teacher_cache = _last_position(
                    teacher, model_ids, attention_mask, model_positions, teacher_cache, use_cache
                )
        if done_here:  # lockstep only: this rank's rows have ended, another rank's have not
            if not any_rank(False, device):
                break
            sequence_ids = torch.cat([sequence_ids, torch.full_like(sequence_ids[:, -1:], pad_token_id)], dim=1)
            attention_mask = torch.cat([attention_mask, ones_column], dim=1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
            continue
        student_scaled = student_logits / temperature
        if teacher is not None:
            teacher_scaled = teacher_logits / temperature
        if no_repeat_ngram_size > 0:
            banned = banned_by_ngram_repeat(sequence_ids, no_repeat_ngram_size, student_scaled.shape[-1])
            student_scaled = student_scaled.masked_fill(banned, -float("inf"))
            if teacher is not None:
                teacher_scaled = teacher_scaled.masked_fill(banned, -float("inf"))
        # softmax, not exp(log_softmax): bit-identical to transformers' sampler, so the draws match it.
        probs = torch.softmax(student_scaled, dim=-1)

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
            step_teacher_hidden.append(teacher_hidden)
        step_from_teacher.append(from_teacher & active)

        finished = finished | (tokens == eos_token_id)
        done_here = bool(finished.all())
        if not (any_rank(not done_here, device) if lockstep else not done_here):
            break
        sequence_ids = torch.cat([sequence_ids, tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, ones_column], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)

    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(step_tokens, dim=1),
        response_mask=torch.stack(step_masks, dim=1),
        student_logprobs=torch.stack(step_student_logprobs, dim=1),
        teacher_logprobs=torch.stack(step_teacher_logprobs, dim=1) if teacher is not None else None,
        teacher_hidden=torch.stack(step_teacher_hidden, dim=1) if teacher is not None else None,
        from_teacher=torch.stack(step_from_teacher, dim=1),
    )
    return score_with_teacher(scoring_teacher, rollout, temperature) if score_after else rollout


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
