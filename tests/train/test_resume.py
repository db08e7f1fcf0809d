"""`train.resume_from_checkpoint` is a real resume: 6 steps straight == 3 steps, stop, 3 more from the checkpoint
(optimizer, scheduler, RNG and data position restored), for each checkpoint format."""

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import RecordStart, make_cfg

from medm.config import ConfigError
from medm.train.checkpoint import read_meta
from medm.train.trainer import run_training

pytestmark = pytest.mark.slow

PLANS = {"components": {"llm": "frozen"}, "full": {}, "lora": {"llm": "lora", "lora": {"r": 4, "dropout": 0.1}}}


@pytest.mark.parametrize("fmt", list(PLANS))
def test_resume_matches_an_uninterrupted_run(fmt, tmp_path, toy_data):
    # 16 samples, batch 4: steps 4-6 run in the second epoch, so the reshuffle must line up too.
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine", warmup_steps=2)
    start = RecordStart()
    straight = run_training(make_cfg(tmp_path / "a", toy_data, PLANS[fmt], **common), callbacks=[start])
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert read_meta(str(ckpt))["format"] == fmt
    resumed = run_training(make_cfg(tmp_path / "b", toy_data, PLANS[fmt], resume_from_checkpoint=str(ckpt), **common))
    assert resumed.state.global_step == 6
    # Steps 1-3 come from the checkpoint's trainer state; 4-6 were trained again and lost the same.
    losses = [[(h["step"], h["loss"]) for h in run.state.log_history if "loss" in h] for run in (straight, resumed)]
    assert [s for s, _ in losses[1]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses[1]] == pytest.approx([v for _, v in losses[0]], rel=1e-5)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # Training moved the weights: the comparison is not between two untouched models.
    assert any(not torch.equal(a[k], v) for k, v in start.state.items())


def test_bad_run_settings_fail_before_training(tmp_path, toy_data):
    with pytest.raises(FileNotFoundError, match="stage.init_from: .*nowhere.* does not exist"):
        run_training(make_cfg(tmp_path / "x", toy_data, {"init_from": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="train.resume_from_checkpoint: .*nowhere.* not found"):
        run_training(make_cfg(tmp_path / "x", toy_data, resume_from_checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="train.fp16: float16 mixed precision needs a CUDA GPU"):
        run_training(make_cfg(tmp_path / "y", toy_data, fp16=True))


@pytest.mark.parametrize("resume", ["checkpoint", "true"])
def test_resuming_a_finished_run_trains_no_extra_step(resume, tmp_path, toy_data):
    """A requeued job whose run already reached max_steps (checkpoint-2 of 2 steps; 4 steps per epoch, so the
    Trainer's epoch loop would go on) ends at once with the checkpoint's weights."""
    out = tmp_path / "run"
    common = dict(max_steps=2, save_strategy="steps", save_steps=2)
    run_training(make_cfg(out, toy_data, **common))
    ckpt = out / "checkpoint-2"
    again = run_training(make_cfg(out, toy_data, resume_from_checkpoint=str(ckpt) if resume == "checkpoint" else True,
                                  **common))
    assert again.state.global_step == 2
    assert [h["step"] for h in again.state.log_history if "loss" in h] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = load_file(ckpt / "model.safetensors")
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    final = load_file(out / "model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], v) for k, v in saved.items())
