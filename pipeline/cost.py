"""Training FLOPs, the unit of the cost ledger, and the compute-matched checkpoint every distillation method keeps.

    FLOPs = 6 N_s (trained tokens) + 2 N_s (generated tokens) + 2 N_t (teacher-forward tokens)

N_s and N_t the student's and the teacher's parameters: a trained token costs a forward and a backward pass, a
generated or teacher-scored token a forward pass. A method's FLOPs count from the pre-trained student: the methods
that start from the SFT init include the init's FLOPs, SeqKD the teacher's generation of its training data.

Table 1 gives every method its own training length, so a method that trains longer can win by compute alone. The
compute-matched table asks instead what each method gives for the same FLOPs (`compute_budget_flops`). Each training
stage applies Table 1's own selection rule, truncated at the budget: the checkpoint with the best validation
Rouge-L among the validations made within the budget (the start when none was). That is the model a run stopped
at the budget would have kept. A run that ends within the budget keeps its Table 1 model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def training_flops(student_parameters: float, trained_tokens: float, generated_tokens: float = 0,
                   teacher_parameters: float = 0, teacher_forward_tokens: float = 0) -> float:
    """The formula above, for one stage's token counts."""
    flops = 6 * student_parameters * trained_tokens + 2 * student_parameters * generated_tokens
    if teacher_forward_tokens:
        flops += 2 * teacher_parameters * teacher_forward_tokens
    return flops


@dataclass
class BudgetCheckpoint:
    """The compute-matched checkpoint of one training run. A recipe calls `before_validation` at every validation,
    before the validation can replace the best state; it lives in the recipe's result, so a resumed run has it."""

    budget_flops: float
    start_flops: float  # spent before the stage's first step
    student_parameters: int
    teacher_parameters: int
    state: dict | None = None  # the best validated weights within the budget; {} when only the start was within it
    valid_rouge_l: float | None = None
    exceeded_at_step: int | None = None  # the first validation past the budget; None: the run ended within it
    spent_at_last_validation: float = 0.0

    def spent(self, trained_tokens: int, generated_tokens: int, teacher_forward_tokens: int) -> float:
        return self.start_flops + training_flops(self.student_parameters, trained_tokens, generated_tokens,
                                                 self.teacher_parameters, teacher_forward_tokens)

    def before_validation(self, step: int, spent: float, best_state: dict, best_rouge_l: float) -> None:
        """Freeze the best so far at the first validation made past the budget."""
        self.spent_at_last_validation = spent
        if self.exceeded_at_step is None and spent > self.budget_flops:
            self.state, self.exceeded_at_step = best_state, step
            self.valid_rouge_l = best_rouge_l if math.isfinite(best_rouge_l) else None  # -inf: nothing validated yet

    def summary(self) -> dict:
        """The metrics file's `at_budget` entry. Every recipe validates at its last step, so the FLOPs at the last
        validation are the run's."""
        return {"budget_flops": self.budget_flops, "exceeded_at_step": self.exceeded_at_step,
                "valid_rouge_l": self.valid_rouge_l, "run_flops": self.spent_at_last_validation,
                "kept": "the start" if self.state == {} else
                        "the Table 1 model" if self.exceeded_at_step is None else "the best validated within budget"}
