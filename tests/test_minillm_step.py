"""One MiniLLM update on tiny models: the fused surrogate equals the full-logits computation in values and student
gradients, the surrogate decreases on its own batch, the ratio starts at 1, and the rollout buffer's advantages
carry no gradient."""

import pytest
import torch
import yaml

from pipeline import losses
from pipeline.config import Architecture, MiniLLMMethod
from pipeline.generation import left_pad, sample
from pipeline.minillm import make_buffer, rollout_diagnostics, surrogate_sums
from pipeline.minillm_loss import policy_loss
from pipeline.models import build_causal_lm
from tests.test_config import REPO

VOCAB, EOS = 40, 0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_causal_lm(Architecture(n_layer=2, n_embd=32, n_head=2), VOCAB, 64, EOS).eval()
    student = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["distill"]["minillm"]
    config = MiniLLMMethod.model_validate(raw)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    prompt_ids, prompt_mask = left_pad(prompts, EOS)
    rollout = sample(student, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(1), teacher=teacher, teacher_mix=config.teacher_mix)
    return teacher, student, config, rollout


def full_response_logits(model, rollout, rows) -> torch.Tensor:
    """The reference: every logit of one full forward pass over [prompt; response], at the positions that
    predict the response tokens."""
    input_ids = torch.cat([rollout.prompt_ids[rows], rollout.response_ids[rows]], dim=1)
    response_attention = torch.ones_like(rollout.response_mask[rows], dtype=torch.long)
    attention = torch.cat([rollout.prompt_mask[rows], response_attention], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    width = rollout.prompt_ids.shape[1]
    return logits[:, width - 1 : width - 1 + rollout.response_ids.shape[1]]


def full_logits_surrogate(student, teacher, buffer, rows, config) -> dict[str, torch.Tensor]:
    """surrogate_sums as it was before the fused LM heads: both models' [n, R, V] logits held at once."""
    rollout, mask = buffer.rollout, buffer.rollout.response_mask[rows]
    student_logits = full_response_logits(student, rollout, rows)
    with torch.no_grad():
        teacher_logits = full_response_logits(teacher, rollout, rows)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    logp_new = log_q.gather(-1, rollout.response_ids[rows].unsqueeze(-1)).squeeze(-1)
    long_sum, clipped = policy_loss(
        logp_new, rollout.student_logprobs[rows], buffer.advantages[rows], buffer.weights[rows], mask, config.clip_eps
    )
    if config.single_step:
        single_sum = losses.reverse_kl(
            student_logits, teacher_logits, mask, weights=buffer.weights[rows], reduction="sum"
        )
    else:
        single_sum = long_sum.new_zeros(())
    with torch.no_grad():
        entropy_sum = (-(log_q.exp() * log_q).sum(-1) * mask).sum()
    return {"single": single_sum, "long": long_sum, "clipped": clipped.float(), "entropy": entropy_sum}


def test_ratio_is_one_before_the_update(setup):
    teacher, student, config, rollout = setup
    rows = torch.arange(rollout.response_ids.shape[0])
    with torch.no_grad():
        logits = full_response_logits(student, rollout, rows)
    logp = torch.log_softmax(logits, -1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = rollout.response_mask > 0
    torch.testing.assert_close(logp[mask], rollout.student_logprobs[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("single_step", [True, False])
def test_fused_surrogate_equals_the_full_logits_computation(setup, single_step):
    teacher, student, config, rollout = setup
    assert bool((rollout.prompt_mask == 0).any()), "the prompts must be left-padded for this test to mean anything"
    config = config.model_copy(update={"single_step": single_step})
    # A step of SGD first, so that q_theta != q_old: ratios move off 1 and some tokens are clipped.
    student = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    student.load_state_dict(setup[1].state_dict())
    buffer = make_buffer(rollout, config)
    with torch.no_grad():
        for parameter in student.parameters():
            noise = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel()))
            parameter.add_(0.3 * noise)
    rows = torch.tensor([3, 0, 2])  # a subset, out of order
    gradients = []
    for surrogate in (surrogate_sums, full_logits_surrogate):
        student.zero_grad(set_to_none=True)
        sums = surrogate(student, teacher, buffer, rows, config)
        (sums["single"] + sums["long"]).backward()
        gradients.append({name: p.grad.clone() for name, p in student.named_parameters()})
        if surrogate is surrogate_sums:
            fused = {name: value.detach() for name, value in sums.items()}
    for name, value in sums.items():
        torch.testing.assert_close(fused[name], value.detach(), atol=1e-5, rtol=1e-5, msg=name)
    assert float(fused["clipped"]) > 0 and float(fused["long"]) != 0
    assert (float(fused["single"]) > 0) == single_step
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_a_head_with_a_bias_is_an_error(setup):
    teacher, student, config, rollout = setup
    student = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    student.lm_head = torch.nn.Linear(16, VOCAB, bias=True)
    with pytest.raises(ValueError, match="bias"):
        surrogate_sums(student, teacher, make_buffer(rollout, config), torch.arange(2), config)


def test_one_update_decreases_the_surrogate_on_its_batch(setup):
    teacher, student, config, rollout = setup
    student = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
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


def test_a_deepspeed_engine_student_gets_the_plain_models_gradients(setup):
    """train_minillm passes the DeepSpeed engine: surrogate_sums runs the wrapped model's body and head, and
    engine.backward puts the same gradients on its parameters as a plain backward on the bare model."""
    from deepspeed import DeepSpeedEngine

    from pipeline import engine
    from pipeline.config import EngineConfig

    teacher, student, config, rollout = setup
    buffer = make_buffer(rollout, config)
    rows = torch.arange(len(buffer))
    engine_config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    engine.setup(engine_config)
    wrapped = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    wrapped.load_state_dict(student.state_dict())
    model_engine = engine.initialize(wrapped, config.optimizer, 1, len(buffer), 1, engine_config)
    assert isinstance(model_engine, DeepSpeedEngine)
    sums = surrogate_sums(model_engine, teacher, buffer, rows, config)
    model_engine.backward(sums["single"] + sums["long"])
    bare = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), VOCAB, 64, EOS).eval()
    bare.load_state_dict(student.state_dict())
    expected = surrogate_sums(bare, teacher, buffer, rows, config)
    (expected["single"] + expected["long"]).backward()
    torch.testing.assert_close(sums["single"].detach(), expected["single"].detach())
    for (name, parameter), (_, reference) in zip(model_engine.module.named_parameters(), bare.named_parameters()):
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, reference.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_official_single_step_term_is_the_unit_weighted_per_token_reverse_kl(setup):
    """single_step_weighted: false (LMOps #255) gives sum_t sum_v q (log q - log p) with w_t = 1, brute force."""
    teacher, student, config, rollout = setup
    buffer = make_buffer(rollout, config)
    mask = rollout.response_mask > 0
    assert (buffer.weights[mask] - 1).abs().max() > 1e-3, "teacher mixing must make w != 1 for this to mean anything"
    rows = torch.arange(len(buffer))
    with torch.no_grad():
        log_q = torch.log_softmax(full_response_logits(student, rollout, rows).double(), -1)
        log_p = torch.log_softmax(full_response_logits(teacher, rollout, rows).double(), -1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    unweighted = surrogate_sums(student, teacher, buffer, rows, config.model_copy(update={"single_step_weighted": False}))
    weighted = surrogate_sums(student, teacher, buffer, rows, config)
    torch.testing.assert_close(unweighted["single"].detach().double(), per_token[mask].sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(weighted["single"].detach().double(), (buffer.weights.double() * per_token)[mask].sum(),
                               atol=1e-4, rtol=1e-5)
    assert abs(float(unweighted["single"].detach()) - float(weighted["single"].detach())) > 1e-3
    torch.testing.assert_close(unweighted["long"], weighted["long"])  # the PPO term keeps w_t in its ratio


def test_official_whitening_keeps_the_raw_returns_in_the_buffer(setup):
    _, _, config, rollout = setup
    raw = make_buffer(rollout, config.model_copy(update={"whiten_advantages": False}))
    official = make_buffer(rollout, config.model_copy(update={"whitening": "official_micro_batch"}))
    round_whitened = make_buffer(rollout, config)
    torch.testing.assert_close(official.advantages, raw.advantages)
    assert not torch.allclose(round_whitened.advantages, raw.advantages)
