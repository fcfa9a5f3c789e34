"""GKD's and DistiLLM's batch sources (pipeline/gkd.py, pipeline/distillm.py): the empirical share of student-sampled
batches matches lambda, DistiLLM's adaptive share follows a hand-computed sequence of validation losses, its fresh /
replayed / gold split matches the schedule, and its replay buffer keeps the newest samples."""

import numpy as np
import pytest

from pipeline.config import DistiLLMMethod, GKDMethod, Optimizer
from pipeline.data import TokenizedExample, TokenizedSplit
from pipeline.distillm import DistiLLMBatches, fresh_share
from pipeline.gkd import GKDBatches

OPTIMIZER = Optimizer(lr=1e-3, min_lr=0, weight_decay=0, grad_clip=1, schedule="constant", warmup_steps=0)


def split(n: int = 10) -> TokenizedSplit:
    return TokenizedSplit.from_examples([TokenizedExample(input_ids=[1, 2, 3 + i, 9], prompt_length=2) for i in range(n)])


def student_sampler(prompts):
    """Stands in for the student: response [7, 8] to every prompt."""
    return [(prompt, [7, 8]) for prompt in prompts]


def gkd_config(fraction: float, seq_kd: bool = False) -> GKDMethod:
    return GKDMethod(steps=10, batch_size=2, micro_batch_size=1, on_policy_fraction=fraction, beta=0.5, temperature=0.9,
                     loss_temperature=1.0, seq_kd=seq_kd, max_new_tokens=4, optimizer=OPTIMIZER, eval_every=1,
                     eval_max_new_tokens=4)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_gkd_samples_from_the_student_on_a_lambda_share_of_steps(fraction):
    source, rng, steps = GKDBatches(gkd_config(fraction), split()), np.random.default_rng(0), 20_000
    origins = [source.batch(step, [0, 1], rng, student_sampler)[1] for step in range(1, steps + 1)]
    share = origins.count("student") / steps
    # Binomial: 4 standard deviations.
    assert abs(share - fraction) <= 4 * (fraction * (1 - fraction) / steps) ** 0.5
    assert set(origins) <= {"student", "gold"}


def test_gkd_batches_hold_the_student_samples_or_the_fixed_responses():
    rng = np.random.default_rng(0)
    pairs, origin = GKDBatches(gkd_config(1.0), split()).batch(1, [0, 3], rng, student_sampler)
    assert origin == "student" and pairs == [([1, 2], [7, 8]), ([1, 2], [7, 8])]
    pairs, origin = GKDBatches(gkd_config(0.0, seq_kd=True), split()).batch(1, [0, 3], rng, student_sampler)
    assert origin == "teacher" and pairs == [([1, 2], [3, 9]), ([1, 2], [6, 9])]


def distillm_config(**changes) -> DistiLLMMethod:
    settings = dict(steps=100, batch_size=2, micro_batch_size=1, divergence="skew_forward_kl", alpha=0.1,
                    initial_student_share=0.0, share_increment=0.1, loss_increase=0.1, adapt_every=10, replay_capacity=6,
                    fresh_schedule="decreasing", max_new_tokens=4, optimizer=OPTIMIZER, eval_every=10, eval_max_new_tokens=4)
    return DistiLLMMethod(**(settings | changes))


def test_distillm_share_adapts_to_the_validation_loss_by_hand():
    """The share rises by 0.1 each time the loss is at least 0.1 above the last loss that raised it (or the first)."""
    source = DistiLLMBatches(distillm_config(), split())
    shares = []
    for step, loss in [(0, 2.0), (10, 2.05), (20, 2.15), (30, 2.2), (40, 2.26), (50, 1.0), (60, 2.4)]:
        source.validated(step, loss)
        shares.append(round(source.student_share, 10))
    # 2.05 < 2.0 + 0.1: no; 2.15 >= 2.1: up, previous 2.15; 2.2 < 2.25: no; 2.26 >= 2.25: up, previous 2.26;
    # 1.0: no (a fall never lowers the share); 2.4 >= 2.36: up.
    assert shares == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3]
    capped = DistiLLMBatches(distillm_config(initial_student_share=0.95), split())
    capped.validated(0, 1.0)
    capped.validated(10, 5.0)
    assert capped.student_share == 1.0


def test_distillm_only_adapts_every_adapt_every_steps():
    source = DistiLLMBatches(distillm_config(adapt_every=20), split())
    source.validated(0, 1.0)
    source.validated(10, 9.0)  # a validation between adaptations: ignored
    assert source.student_share == 0.0
    source.validated(20, 9.0)
    assert source.student_share == pytest.approx(0.1)


def test_adapt_every_must_fall_on_validations():
    with pytest.raises(ValueError, match="adapt_every"):
        distillm_config(adapt_every=15)


@pytest.mark.parametrize("schedule", ["decreasing", "constant", "increasing"])
def test_distillm_batches_follow_the_share_and_the_fresh_schedule(schedule):
    """With share s and a full buffer, P(fresh) = s * fresh(step), P(replay) = s - that, P(gold) = 1 - s."""
    share, steps, step = 0.6, 100, 30
    source = DistiLLMBatches(distillm_config(initial_student_share=share, fresh_schedule=schedule, steps=steps), split())
    rng = np.random.default_rng(1)
    while len(source.buffer) < source.buffer.maxlen:  # fill the buffer first: until then every SGO batch is fresh
        source.batch(step, [0, 1], rng, student_sampler)
    draws = 20_000
    origins = [source.batch(step, [0, 1], rng, student_sampler)[1] for _ in range(draws)]
    fresh = share * fresh_share(schedule, step, steps)
    expected = {"student": fresh, "replay": share - fresh, "gold": 1 - share}
    for origin, probability in expected.items():
        assert abs(origins.count(origin) / draws - probability) <= 4 * (probability * (1 - probability) / draws) ** 0.5 + 1e-9


def test_distillm_replay_buffer_keeps_the_newest_samples_and_replays_them():
    source = DistiLLMBatches(distillm_config(initial_student_share=1.0, replay_capacity=3), split())
    rng = np.random.default_rng(0)
    counter = iter(range(100))

    def numbered_student(prompts):
        return [(prompt, [next(counter)]) for prompt in prompts]

    for _ in range(3):  # buffer not full: always fresh
        assert source.batch(1, [0, 1], rng, numbered_student)[1] == "student"
    assert [response for _, response in source.buffer] == [[3], [4], [5]]
    pairs, origin = source.batch(100, [0, 1], rng, numbered_student)  # fresh share 0 at the last step: replay
    assert origin == "replay" and all(pair in source.buffer for pair in pairs) and len(set(map(str, pairs))) == 2
    state = source.state_dict()
    restored = DistiLLMBatches(distillm_config(initial_student_share=0.0, replay_capacity=3), split())
    restored.load_state_dict(state)
    assert list(restored.buffer) == list(source.buffer) and restored.student_share == 1.0
