"""DistiLLM (Ko et al. 2024; the reference is its public code, jongwooko/distillm): skew KL (`skew_forward_kl`
KL(p || a p + (1 - a) q), or `skew_reverse_kl` KL(q || (1 - a) p + a q)) on a mix of gold responses and
student-generated outputs (SGO), with an adaptive off-policy schedule:

    share s = initial_student_share; previous = validation loss before training
    every step, u ~ U(0, 1):
        u < s * fresh(step), or u < s while the buffer is not full:   sample SGO for the batch, push them to the buffer
        u < s:                                                        a batch drawn uniformly from the buffer (replay)
        otherwise:                                                    the gold responses
    fresh(step) = 1 - step / steps (decreasing, the code's default), 1/2 (constant) or step / steps (increasing)
    every `adapt_every` steps: if validation loss >= previous + loss_increase: s = min(s + share_increment, 1),
                               previous = validation loss

The buffer keeps the last `replay_capacity` SGO (oldest dropped first), per rank. The loop is
pipeline/student_data.py's.
"""

from __future__ import annotations

from collections import deque

from pipeline.config import DistiLLMMethod
from pipeline.data import TokenizedSplit
from pipeline.student_data import fixed_pairs, train_on_student_data


def fresh_share(schedule: str, step: int, steps: int) -> float:
    """Of the SGO batches at `step`, the share generated fresh rather than replayed."""
    return {"decreasing": 1.0 - step / steps, "constant": 0.5, "increasing": step / steps}[schedule]


class DistiLLMBatches:
    def __init__(self, config: DistiLLMMethod, split: TokenizedSplit):
        self.config, self.split = config, split
        self.student_share = config.initial_student_share
        self.previous_loss: float | None = None
        self.buffer: deque = deque(maxlen=config.replay_capacity)

    def batch(self, step, indices, rng, sample_student):
        pairs, share = fixed_pairs(self.split, indices), self.student_share
        draw = rng.random()
        full = len(self.buffer) == self.buffer.maxlen
        if draw < share * fresh_share(self.config.fresh_schedule, step, self.config.steps) or (draw < share and not full):
            generated = sample_student([prompt for prompt, _ in pairs])
            self.buffer.extend(generated)
            return generated, "student"
        if draw < share:
            # Uniform without replacement; the buffer holds at least a batch here (it filled up first).
            chosen = rng.choice(len(self.buffer), size=len(pairs), replace=False)
            return [self.buffer[int(i)] for i in chosen], "replay"
        return pairs, "gold"

    def validated(self, step: int, loss: float) -> None:
        if self.previous_loss is None:
            self.previous_loss = loss  # before training
        elif step % self.config.adapt_every == 0 and loss >= self.previous_loss + self.config.loss_increase:
            self.student_share = min(self.student_share + self.config.share_increment, 1.0)
            self.previous_loss = loss

    def metrics(self) -> dict[str, float]:
        return {"train/student_share": self.student_share, "train/buffer_fill": float(len(self.buffer))}

    def state_dict(self) -> dict:
        return {"student_share": self.student_share, "previous_loss": self.previous_loss, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.student_share, self.previous_loss = state["student_share"], state["previous_loss"]
        self.buffer.extend(state["buffer"])


def train_distillm(*, config: DistiLLMMethod, train_split: TokenizedSplit, **kwargs):
    return train_on_student_data(
        source=DistiLLMBatches(config, train_split), prompt_split=train_split, config=config,
        divergence=config.divergence, beta=0.0, alpha=config.alpha, loss_temperature=1.0, sampling_temperature=1.0,
        stage_key="distill.distillm", **kwargs,
    )
