"""params.yaml validation: every mistake is one line naming the key, exit status 2, no traceback."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.max_prompt_length < params.data.max_length


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["data"].update(max_lenght=10), r"data\.max_lenght: unknown key"),
        (lambda p: p.update(evaluatee={}), r"evaluatee: unknown key"),
        (lambda p: p["train_teacher"]["optimizer"].update(lr="fast"), r"train_teacher\.optimizer\.lr: .*number"),
        (lambda p: p["init_student"]["optimizer"].update(lr=-1.0), r"init_student\.optimizer\.lr: .*greater than 0"),
        (lambda p: p["data"].update(max_prompt_length=500), r"data: max_prompt_length \(500\) must be below max_length"),
        (lambda p: p["evaluate"].update(seeds=[]), r"evaluate\.seeds: .*at least 1"),
        (lambda p: p["data"].update(source="web"), r"data\.source: .*'synthetic'"),
        (lambda p: p["models"]["students"]["180K"].update(name_or_path="gpt2"), r"models\.students\.180K: give exactly one"),
        (lambda p: p["models"]["students"].update({"1.5M": p["models"]["students"]["180K"]}),
         r"models\.students\.1\.5M\.\[key\]: String should match"),
        (lambda p: p["models"].update(students={}), r"models\.students: .*at least 1"),
        (lambda p: p["models"]["teacher"]["arch"].update(n_head=3), r"models\.teacher\.arch: n_embd .* divisible"),
        (lambda p: p["evaluate"].update(max_new_tokens=4096), r"evaluate\.max_new_tokens \(4096\) exceeds"),
        (lambda p: p["engine"].update(precision="bf16"), r"engine: the CPU path trains in fp32"),
        (lambda p: p["data"].update(source="jsonl", jsonl_path="a.jsonl", splits={"train": "t", "valid": "v", "test": "e"}),
         r"data: source 'jsonl' needs exactly one of jsonl_path \(split at random\) and splits"),
        (lambda p: p["data"].update(splits={"train": "t", "valid": "v", "test": "e"}), r"data: splits: only for source 'jsonl'"),
        (lambda p: p["data"].update(source="jsonl", splits={"train": "t", "valid": "v"}), r"data\.splits\.test: required key"),
        (lambda p: p["data"].update(long_eval_prompts="cut"), r"data\.long_eval_prompts: .*'drop'"),
        (lambda p: p["models"]["students"]["180K"].update(overrides={"evaluate": {"seeds": [1]}}),
         r"models\.students\.180K: overrides\.evaluate: not a student stage's section"),
        (lambda p: p["models"]["students"]["180K"].update(overrides={"distill": {"seqkd": {"max_new_tokens": 8}}}),
         r"overrides\.distill\.seqkd\.max_new_tokens: shared by every student \(teacher_generate reads it\)"),
        (lambda p: p["models"]["students"]["180K"].update(overrides={"init_student": {"optimizer": {"lr": -1}}}),
         r"params\.yaml: models\.students\.180K\.overrides: init_student\.optimizer\.lr: .*greater than 0"),
        (lambda p: p["distill"]["minillm"].update(whitening="global"), r"distill\.minillm\.whitening: .*'round'"),
        (lambda p: p["evaluate"].update(no_repeat_ngram_size=-1), r"evaluate\.no_repeat_ngram_size: .*greater than or equal to 0"),
        (lambda p: p.pop("seed"), r"seed: required key is missing"),
        (lambda p: p["distill"]["minillm"].update(teacher_mix=1.5), r"distill\.minillm\.teacher_mix: .*less than 1"),
        (lambda p: p["distill"]["minillm"].update(teacher_mix=-0.1), r"distill\.minillm\.teacher_mix: .*greater than or equal to 0"),
        (lambda p: p["init_student"].update(steps=10), r"init_student: give exactly one of epochs and steps"),
        (lambda p: p["distill"]["sft_long"]["train"].update(steps=7),
         r"distill\.sft_long\.train\.steps \(7\) must equal distill\.minillm\.steps \(480\)"),
        (lambda p: p["distill"]["kd"].update(ratio=2), r"distill\.kd\.ratio: .*less than or equal to 1"),
        (lambda p: p["distill"]["minillm"]["optimizer"].update(lr=-5e-4), r"distill\.minillm\.optimizer\.lr: .*greater than 0"),
        (lambda p: p["distill"]["minillm"].update(steps="many"), r"distill\.minillm\.steps: .*valid integer"),
        (lambda p: p["models"]["teacher"].update(arch=None, name_or_path="/no/such/checkpoint"),
         r"models\.teacher\.name_or_path: '/no/such/checkpoint' is not an existing directory"),
        (lambda p: p["models"]["students"]["180K"].update(arch=None, name_or_path="models/180K/sft/best_loss"),
         r"models\.students\.180K\.name_or_path: 'models/180K/sft/best_loss' is not an existing directory"),
        (lambda p: p["models"]["teacher"].update(arch=None, name_or_path="gpt2--xl."),
         r"models\.teacher\.name_or_path: 'gpt2--xl\.' is neither an existing directory nor a valid Hub id"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, edit))


def test_stage_prints_one_line_and_exits_2(tmp_path):
    write_params(tmp_path, lambda p: p["data"].update(max_lenght=10))
    completed = subprocess.run(
        [sys.executable, "-m", "stages.check_params", "--out", "checks/params.ok"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: params.yaml: data.max_lenght: unknown key"
    assert not (tmp_path / "checks").exists()


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_invalid_utf8_params_name_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\ndata:\n  source: \xff\n")
    with pytest.raises(ConfigError, match=r"params.yaml:3: not valid UTF-8"):
        load_params(path)


def test_name_or_path_accepts_a_local_directory_and_a_cached_hub_model(tmp_path, monkeypatch):
    import huggingface_hub.constants

    local = tmp_path / "my-model"
    local.mkdir()
    load_params(write_params(tmp_path, lambda p: p["models"]["teacher"].update(arch=None, name_or_path=str(local))))
    # The Hub cache layout: models--<org>--<name>/refs/main names the snapshot holding the files.
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--some-org--cached-model" / "refs").mkdir()
    (cache / "models--some-org--cached-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_params(write_params(tmp_path, lambda p: p["models"]["teacher"].update(arch=None, name_or_path="some-org/cached-model")))


def test_uncached_hub_name_fails_fast_offline_or_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = write_params(tmp_path, lambda p: p["models"]["students"]["180K"].update(arch=None, name_or_path="no-org/no-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"models\.students\.180K\.name_or_path: 'no-org/no-model' is not a local "
                                          r"directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set$"):
        load_params(path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens on port 1
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"'no-org/no-model' .* and 127\.0\.0\.1 is unreachable$"):
        load_params(path)
    assert time.monotonic() - started < 5


def test_check_params_stage_rejects_an_unreachable_model_in_one_line(tmp_path):
    """Through the real entry point, with no HF_HUB_OFFLINE: a clear line within seconds, not half a minute of
    retries and a traceback."""
    write_params(tmp_path, lambda p: p["models"]["teacher"].update(arch=None, name_or_path="no-org/no-model"))
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "stages.check_params", "--out", "checks/params.ok"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:1",
             "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: models.teacher.name_or_path: 'no-org/no-model' is not a local directory nor in the "
        "Hugging Face cache, and 127.0.0.1 is unreachable"
    )
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "checks").exists()
    assert time.monotonic() - started < 60


def test_the_official_overlay_switches_on_every_official_behaviour_and_validates(tmp_path, monkeypatch, capsys):
    import sys

    from pipeline import overlay
    from pipeline.config import Params

    paper = yaml.safe_load((REPO / "configs" / "paper-gpt2.yaml").read_text())
    official = overlay.deep_merge(paper, yaml.safe_load((REPO / "configs" / "official-gpt2.yaml").read_text()))
    params = Params.model_validate(official)
    minillm = params.distill.minillm
    assert (minillm.whitening, minillm.single_step_weighted, minillm.returns, minillm.reward_scale) == (
        "official_micro_batch", False, "discounted", 0.5)
    assert (params.evaluate.no_repeat_ngram_size, params.evaluate.exposure_bias_skip_first) == (6, True)
    assert params.data.long_eval_prompts == "truncate" and minillm.pt_teacher_kd_ratio == 0.5
    assert minillm.optimizer == Params.model_validate(paper).distill.minillm.optimizer  # the rest is the paper's
    base_view, medium_view = params.for_student("120M"), params.for_student("340M")
    assert (base_view.distill.minillm.batch_size, medium_view.distill.minillm.batch_size) == (256, 64)
    assert (medium_view.init_student.optimizer.lr, params.for_student("760M").init_student.epochs) == (1.0e-4, 10)
    # The command writes the merged file, and a bad overlay is one line naming the key.
    monkeypatch.setattr(sys, "argv", ["overlay", str(REPO / "configs" / "paper-gpt2.yaml"),
                                      str(REPO / "configs" / "official-gpt2.yaml"), "--out", str(tmp_path / "params.yaml")])
    overlay.main()
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == official
    (tmp_path / "bad.yaml").write_text("evaluate: {no_repeat_ngram_size: -6}\n")
    monkeypatch.setattr(sys, "argv", ["overlay", str(REPO / "configs" / "paper-gpt2.yaml"), str(tmp_path / "bad.yaml"),
                                      "--out", str(tmp_path / "bad-params.yaml")])
    with pytest.raises(ConfigError, match=r"evaluate\.no_repeat_ngram_size: .*greater than or equal to 0"):
        overlay.main()
    assert not (tmp_path / "bad-params.yaml").exists()


def test_the_opt_llama_and_qwen_configs_hold_the_official_scripts_values_and_validate():
    """Spot checks against microsoft/LMOps minillm/scripts/{opt,llama}/ (the values quoted in each config's comments):
    the per-size SFT rates, MiniLLM's schedule and batch per optimiser step, the fp16 teacher and gradient
    checkpointing; and the LoRA overlay's adapter and SFT settings."""
    from pipeline import overlay
    from pipeline.config import Params

    def config(name: str) -> Params:
        return Params.model_validate(yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()))

    opt, llama, qwen = config("paper-opt"), config("paper-llama"), config("qwen")
    for params, teacher_precision in ((opt, "fp16"), (llama, "fp16"), (qwen, "bf16")):
        engine = params.engine
        assert (engine.zero_stage, engine.gradient_checkpointing, engine.teacher_precision, engine.lora) == (
            2, True, teacher_precision, None)
        minillm = params.distill.minillm
        assert (minillm.steps, minillm.rollouts_per_round, minillm.inner_epochs, minillm.batch_size) == (5000, 256, 4, 64)
        assert (minillm.optimizer.lr, minillm.optimizer.warmup_steps, minillm.pt_teacher_kd_ratio) == (5e-6, 100, 0.5)
        assert (minillm.reward_scale, minillm.reward_clip, minillm.teacher_mix) == (0.5, 100.0, 0.2)
        assert (params.train_teacher.epochs, params.train_teacher.optimizer.lr, params.distill.kd.ratio) == (10, 1e-5, 0.5)
        assert params.data.max_length == 512 and params.data.max_prompt_length == 256
    assert [opt.for_student(s).init_student.optimizer.lr for s in opt.models.students] == [5e-5, 5e-5, 1e-5]
    assert opt.for_student("6700M").distill.minillm.micro_batch_size == 4  # train_6.7B_13B.sh: 4 per GPU
    assert (opt.distill.minillm.optimizer.schedule, llama.distill.minillm.optimizer.schedule) == ("constant", "cosine")
    assert llama.init_student.optimizer.lr == 1e-5 and list(llama.models.students) == ["7B"]
    assert qwen.models.teacher.name_or_path == "Qwen/Qwen2.5-7B"

    lora = Params.model_validate(overlay.deep_merge(
        yaml.safe_load((REPO / "configs" / "paper-llama.yaml").read_text()),
        yaml.safe_load((REPO / "configs" / "paper-llama-lora.yaml").read_text())))
    adapter = lora.engine.lora
    assert (adapter.r, adapter.alpha, adapter.dropout, adapter.target_modules) == (8, 32.0, 0.1, ["q_proj", "v_proj"])
    assert (lora.init_student.optimizer.lr, lora.init_student.epochs, lora.init_student.batch_size) == (5e-4, 20, 64)
    assert lora.init_student.optimizer.schedule == "cosine"  # the rest of the optimiser stays the paper config's
    assert lora.distill.minillm.batch_size == 256


def test_engine_lora_and_precisions_are_validated(tmp_path):
    from pipeline.config import Params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for engine_keys, message in (({"teacher_precision": "fp8"}, "engine.teacher_precision"),
                                 ({"lora": {"r": 0, "alpha": 1.0, "dropout": 0.0, "target_modules": ["q_proj"]}}, "engine.lora.r"),
                                 ({"lora": {"r": 4, "alpha": 1.0, "dropout": 0.0, "target_modules": []}}, "engine.lora.target_modules"),
                                 ({"lora": {"r": 4, "alpha": 1.0, "dropout": 0.0, "target": ["q_proj"]}}, "engine.lora.target")):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params | {"engine": params["engine"] | engine_keys}))
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_params(path)
    assert Params.model_validate(params).engine.lora is None
