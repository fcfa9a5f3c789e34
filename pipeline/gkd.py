"""GKD (Agarwal et al. 2024, "On-policy distillation of language models"; TRL's GKDTrainer): at every step, with
probability lambda (`on_policy_fraction`) the batch's responses are the student's own samples (at `temperature`),
otherwise the fixed ones: gold, or the teacher's samples with `seq_kd` (the stage passes teacher_data's split). The
loss is the token-level generalised JSD(beta) between teacher and student on them (pipeline/losses.py: beta 0 is
forward KL, 1 reverse KL), logits divided by `loss_temperature`. The loop is pipeline/student_data.py's.
"""

from __future__ import annotations

from pipeline.config import GKDMethod
from pipeline.data import TokenizedSplit
from pipeline.student_data import fixed_pairs, train_on_student_data


class GKDBatches:
    """The student's samples with probability lambda, else the split's fixed responses; one coin per step, the
    same on every rank."""

    def __init__(self, config: GKDMethod, split: TokenizedSplit):
        self.on_policy_fraction, self.split, self.fixed = config.on_policy_fraction, split, "teacher" if config.seq_kd else "gold"

    def batch(self, step, indices, rng, sample_student):
        pairs = fixed_pairs(self.split, indices)
        if rng.random() < self.on_policy_fraction:
            return sample_student([prompt for prompt, _ in pairs]), "student"
        return pairs, self.fixed

    def validated(self, step: int, loss: float) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train_gkd(*, config: GKDMethod, train_split: TokenizedSplit, **kwargs):
    return train_on_student_data(
        source=GKDBatches(config, train_split), prompt_split=train_split, config=config, divergence="jsd",
        beta=config.beta, alpha=0.0, loss_temperature=config.loss_temperature, sampling_temperature=config.temperature,
        stage_key="distill.gkd", **kwargs,
    )
