"""What the distillation losses take from a model instead of its logits: the last hidden states (after the final
norm) that predict each response token, and the LM-head weight that turns them into logits. The losses run both
heads inside chunks of positions (pipeline/losses.py: fused_head_reverse_kl, fused_head_divergence), so neither
model's [B, T, V] logits ever exist.
"""

from __future__ import annotations

import sys

import torch

# Positions per chunk of the fused LM-head loss; its memory is ~5 fp32 [B, chunk, V] tensors. Measured with
# benchmarks/bench_step.py (one thread) on the embedded default's shapes (vocabulary 1024, batch 16 x 48 response
# tokens), the logits part forward + backward takes 24 / 22 / 21 / 20 ms at chunk 8 / 16 / 32 / 64. 16 costs ~2 ms
# a step against 64 and keeps the logits part within 1.5x one model's fp32 logits from 64 response tokens up
# (GPT-2 shapes: 1.27x at 64).
FUSED_CHUNK = 16


def unwrapped(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (train_minillm passes the engine), or the model itself.
    Its parameters are the engine's, so DeepSpeed's gradient hooks on them still fire."""
    # An engine can exist only once deepspeed is imported; importing it just to check would cost ~75 MiB.
    deepspeed = sys.modules.get("deepspeed")
    return model.module if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else model


def lm_head_weight(model) -> torch.Tensor:
    """The LM-head weight [V, d] that turns last hidden states into logits."""
    head = unwrapped(model).get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"{type(unwrapped(model)).__name__}'s LM head has a bias; MiniLLM's fused loss assumes a bias-free head")
    return head.weight


def with_lm_head(model, loss_of_head):
    """`loss_of_head(W)` with W the model's LM-head weight [V, d], gathered first where ZeRO-3 partitions it."""
    module = unwrapped(model)
    if hasattr(module, "zero3_head"):  # engine.ZeRO3HeadCall, attached by engine.initialize under ZeRO-3
        return module.zero3_head(loss_of_head)
    return loss_of_head(lm_head_weight(module))


def response_hidden(model, rollout, indices) -> torch.Tensor:
    """Last hidden states (after the final norm) that predict each response token, [n, R, d], from one forward pass
    of the model over [prompt; response]; with_lm_head gives the weight that turns them into logits. `rollout`
    is a generation.Rollout or a student_data.Sequences: left-padded prompts, right-padded responses."""
    prompt_ids, prompt_mask = rollout.prompt_ids[indices], rollout.prompt_mask[indices]
    response_ids, response_mask = rollout.response_ids[indices], rollout.response_mask[indices]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, torch.ones_like(response_mask, dtype=prompt_mask.dtype)], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    # Through the model's own forward (a DeepSpeed engine's, when given one), with its LM head kept to one position:
    # under ZeRO-3 a step whose student never ran the engine's forward trained to other parameters than ZeRO-0's
    # (tests/test_zero3.py, GKD and KD), even though the module's hooks gather the weights either way.
    output = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, output_hidden_states=True,
                   logits_to_keep=1)
    hidden = output.hidden_states[-1]
    prompt_width = prompt_ids.shape[1]
    return hidden[:, prompt_width - 1 : prompt_width - 1 + response_ids.shape[1]]
