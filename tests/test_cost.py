"""pipeline/cost.py by hand: the FLOPs formula, and which checkpoint the compute-matched table keeps."""

import torch

from pipeline.cost import BudgetCheckpoint, training_flops


def test_training_flops_by_hand():
    # 6 * 1000 * 50 + 2 * 1000 * 40 + 2 * 5000 * 60 = 300,000 + 80,000 + 600,000
    assert training_flops(1000, 50, 40, 5000, 60) == 980_000
    assert training_flops(1000, 50) == 300_000  # SFT: no generation, no teacher
    assert training_flops(5000, 0, 7) == 70_000  # SeqKD's data: the teacher generating 7 tokens


def test_the_first_validation_past_the_budget_freezes_the_best_so_far():
    budget = BudgetCheckpoint(budget_flops=1000, start_flops=100, student_parameters=1, teacher_parameters=10)
    assert budget.spent(50, 0, 0) == 400  # 100 + 6 * 50
    a, b, c = ({"w": torch.tensor(float(i))} for i in range(3))
    budget.before_validation(0, budget.spent(0, 0, 0), a, float("-inf"))  # the start: within, nothing to freeze
    budget.before_validation(2, budget.spent(100, 0, 0), a, 20.0)  # 700: within
    assert budget.exceeded_at_step is None and budget.state is None
    budget.before_validation(4, budget.spent(100, 10, 10), b, 25.0)  # 700 + 20 + 200 = 920: within
    budget.before_validation(6, budget.spent(150, 10, 10), b, 25.0)  # 1220: past, the best so far is kept
    budget.before_validation(8, budget.spent(300, 10, 10), c, 30.0)  # later validations change nothing
    assert (budget.exceeded_at_step, budget.state, budget.valid_rouge_l) == (6, b, 25.0)
    # The run's FLOPs are those of its last validation (every recipe validates at its last step).
    assert budget.summary() == {"budget_flops": 1000, "exceeded_at_step": 6, "valid_rouge_l": 25.0,
                                "run_flops": 100 + 1800 + 20 + 200, "kept": "the best validated within budget"}


def test_a_budget_exceeded_before_any_validation_keeps_the_start():
    budget = BudgetCheckpoint(budget_flops=10, start_flops=0, student_parameters=1, teacher_parameters=0)
    budget.before_validation(2, budget.spent(5, 0, 0), {}, float("-inf"))  # 30 > 10, nothing validated yet
    assert (budget.exceeded_at_step, budget.state, budget.valid_rouge_l) == (2, {}, None)
    assert budget.summary()["kept"] == "the start"
