"""One MiniLLM update on tiny models: the surrogate decreases on its own batch, the ratio starts at 1, and the
rollout buffer's advantages carry no gradient."""

import pytest
import torch
import yaml

from pipeline.config import Architecture, MiniLLMMethod
from pipeline.generation import left_pad, sample
from pipeline.minillm import make_buffer, response_logits, rollout_diagnostics, surrogate_sums
from pipeline.models import build_gpt2
from tests.test_config import REPO

VOCAB, EOS = 40, 0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_gpt2(Architecture(n_layer=2, n_embd=32, n_head=2), VOCAB, 64, EOS).eval()
    student = build_gpt2(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["distill"]["minillm"]
    config = MiniLLMMethod.model_validate(raw)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    prompt_ids, prompt_mask = left_pad(prompts, EOS)
    rollout = sample(student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(1), teacher=teacher, teacher_mix=config.teacher_mix)
    return teacher, student, config, rollout


def test_ratio_is_one_before_the_update(setup):
    teacher, student, config, rollout = setup
    rows = torch.arange(rollout.response_ids.shape[0])
    with torch.no_grad():
        logits = response_logits(student, rollout, rows)
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = rollout.response_mask > 0
    torch.testing.assert_close(logp[mask], rollout.student_logprobs[mask], atol=1e-5, rtol=0)


def test_one_update_decreases_the_surrogate_on_its_batch(setup):
    teacher, student, config, rollout = setup
    student = build_gpt2(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    student.load_state_dict(setup[1].state_dict())
    buffer = make_buffer(rollout, config)
    assert not buffer.advantages.requires_grad and not buffer.weights.requires_grad
    rows = torch.arange(len(buffer))
    tokens = rollout.response_mask.sum()

    def surrogate():
        sums = surrogate_sums(student, teacher, buffer, rows, config)
        return (sums["single"] + sums["long"]) / tokens

    before = surrogate()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = surrogate()
    assert after < before - 1e-4
    assert all(p.grad is None for p in teacher.parameters())


def test_rollout_diagnostics_are_consistent(setup):
    _, _, config, rollout = setup
    diagnostics = rollout_diagnostics(make_buffer(rollout, config), config.teacher_mix)
    assert 0.0 <= diagnostics["rollout/teacher_token_share"] <= 1.0
    assert diagnostics["rollout/response_length"] == pytest.approx(float(rollout.response_mask.sum(1).mean()))
    # Weights are bounded by 1/(1 - alpha) without any clipping.
    assert diagnostics["rollout/importance_weight_mean"] <= 1 / (1 - config.teacher_mix) + 1e-6
