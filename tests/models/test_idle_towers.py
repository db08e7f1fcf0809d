"""Idle towers: in training, a tower the batch gives nothing to still runs on a blank input, times 0, so every
trainable parameter gets a gradient (exactly 0) and the loss is unchanged (what keeps DDP / ZeRO ranks in step on
mixed data: tests/train/test_distributed_mixed.py)."""

import inspect
from pathlib import Path

import torch

from medm.config import load_yaml
from medm.models import build_model
from medm.models.tiny import tiny_model_config, tiny_vision

REPO = Path(__file__).resolve().parents[2]


def _model_2d_3d():
    cfg = tiny_model_config()
    cfg["vision3d"] = {"name": "vit3d", **tiny_vision("vit3d")}
    cfg["connector3d"] = {"name": "spatial_pool", "stride": 2}
    torch.manual_seed(0)
    return build_model(cfg)


def test_text_only_training_batch_gives_every_tower_a_zero_gradient_and_the_same_loss():
    model, tok = _model_2d_3d()
    model.vision.requires_grad_(False)  # a frozen 2D encoder (its connector trains), a trained 3D one
    ids = tok(["Is the heart enlarged? No."], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, labels=ids).loss
    out = model.train()(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, expected)
    out.loss.backward()
    for name in ("connector", "connector3d", "vision3d"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and not g.any() for g in grads), name
    # The frozen 2D encoder needs no gradient; the LLM learned from the text as usual.
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_an_image_batch_leaves_the_idle_3d_tower_at_zero_and_the_image_path_unchanged():
    model, tok = _model_2d_3d()
    n = model.num_image_tokens
    ids = tok(["<image>" * n + "Is there a lesion? No."], return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, labels=ids, pixel_values=pixels).loss
    out = model.train()(input_ids=ids, labels=ids, pixel_values=pixels)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in model.connector3d.parameters())


def test_a_frozen_tower_is_not_run_for_nothing_outside_zero3():
    model, tok = _model_2d_3d()
    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    calls = []
    model.vision3d.register_forward_hook(lambda *a: calls.append(1))
    ids = tok(["Is the heart enlarged? No."], return_tensors="pt").input_ids
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert calls == []


def test_trained_batch_norms_keep_their_running_statistics_on_the_blank():
    from medm.models.modeling_medm import idle_tower_zero

    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(2))
    connector = torch.nn.Linear(900, 8)
    encoder.train()
    before = encoder[1].running_mean.clone()
    zero = idle_tower_zero(encoder, connector, torch.zeros(1, 3, 32, 32))
    assert float(zero.detach()) == 0 and zero.requires_grad
    assert torch.equal(encoder[1].running_mean, before) and encoder[1].training


def test_qwenvl_text_only_training_batch_runs_the_tower_with_zero_gradients():
    torch.manual_seed(0)
    model, proc = build_model(load_yaml(str(REPO / "configs" / "model" / "tiny-qwen2.5-vl.yaml")))
    model.model.visual.requires_grad_(True)
    # Generation and the Trainer read forward's signature: the wrapper keeps the transformers one.
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
    ids = proc.tokenizer(["Is the heart enlarged? No."], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, labels=ids).loss
    out = model.train()(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.model.visual.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)
    # The hook is gone after the call: an eval forward does not run the tower.
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert calls == []
