"""Grayscale (1-channel) CLIP / SigLIP towers exported to transformers' LLaVA format (RGB input, each channel's
patch weights the 1-channel ones / 3) and imported back: transformers alone answers like `medm infer`."""

import numpy as np
import pytest
import torch
from interop_helpers import QUESTION
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from medm.cli import main
from medm.infer.generate import GenerationSettings, Predictor
from medm.interop.llava_hf import export_llava_hf
from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config

QUESTIONS = [QUESTION, "Is the image bright?", "Describe the finding."]


def _gray_model(vision):
    cfg = tiny_model_config(vision=vision, connector={"name": "mlp", "type": "mlp2x_gelu"}, family="qwen2")
    cfg["vision"]["config"]["num_channels"] = 1
    cfg["vision"].update(image_mean=[0.45], image_std=[0.27])
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    with torch.no_grad():  # a sharper LLM, so greedy decoding varies (interop_helpers.tiny_model)
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval(), tok


def _gray_image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (45, 61), dtype=np.uint8), mode="L")


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_grayscale_tower_exports_and_imports_back(tmp_path, vision):
    model, tok = _gray_model(vision)
    save_model(model, tok, str(tmp_path / "medm"))
    export_llava_hf(str(tmp_path / "medm"), str(tmp_path / "llava"))

    llava = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava", backend="pil")
    assert llava.config.vision_config.num_channels == 3
    patch = llava.model.vision_tower.get_input_embeddings().weight
    own = model.vision.model.get_input_embeddings().weight
    assert torch.equal(patch, (own / 3).repeat(1, 3, 1, 1))
    assert list(processor.image_processor.image_mean) == [0.45] * 3
    assert list(processor.image_processor.image_std) == [0.27] * 3

    pred = Predictor(model, tok)
    answers = 0
    for seed, question in enumerate(QUESTIONS):
        image = _gray_image(seed)
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        ids = pred.encode([{"role": "user", "content": "<image>\n" + question}])
        pixels = pred.images([image])  # (1, 1, H, W): medm reads the image as L
        assert pixels.shape[1] == 1 and inputs["input_ids"][0].tolist() == ids
        # LLaVA's RGB pixels are three copies of medm's grayscale ones.
        assert torch.equal(inputs["pixel_values"], pixels.expand(-1, 3, -1, -1))
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
            theirs = llava(**inputs).logits
        # w / 3 summed over three channels rounds differently from w: float32 noise, amplified by the sharp LLM.
        assert (ours - theirs).abs().max().item() <= 1e-4
        new = pred.generate_ids([ids], pixels, GenerationSettings(max_new_tokens=8))[0]
        with torch.no_grad():
            out_ids = llava.generate(**inputs, max_new_tokens=8)
        assert out_ids[0, len(ids):].tolist() == new
        answers += len(set(new)) > 1
    assert answers  # the answers are not one repeated token

    # Import back: a 1-channel tower again, its weights the channels' sum (= the original up to rounding).
    assert main(["import", "llava-hf", str(tmp_path / "llava"), str(tmp_path / "back")]) == 0
    back, _ = load_model(str(tmp_path / "back"))
    assert back.config.vision["config"]["num_channels"] == 1
    assert back.config.vision["image_mean"] == [0.45] and back.config.vision["image_std"] == [0.27]
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=1e-7, rtol=1e-6)


@pytest.mark.slow
def test_demo_model_exported_answers_held_out_questions_like_medm(tmp_path, monkeypatch):
    """`medm demo` (a few steps; its CLIP tower reads 1-channel 64 px phantoms), exported to llava-hf: transformers
    alone gives the same greedy answers as medm's Predictor on the demo's held-out questions."""
    from medm.data.annotations import load_records

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's thread count
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--pretrain-steps", "2", "--finetune-steps", "6", "--n-train", "16",
                 "--n-test", "6"]) == 0
    ckpt = out / "finetune"
    assert main(["export", "--to", "llava-hf", str(ckpt), str(tmp_path / "llava")]) == 0
    llava = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava", backend="pil")
    assert llava.config.vision_config.num_channels == 3
    pred = Predictor.from_pretrained(str(ckpt))
    assert pred.model.config.vision["config"]["num_channels"] == 1
    records = load_records(str(out / "data" / "test.json"))
    settings = GenerationSettings(max_new_tokens=6)
    for rec in records:
        image = Image.open(out / "data" / rec.image[0])
        question = next(m["content"] for m in rec.messages() if m["role"] == "user").replace("<image>", "").strip()
        ids = pred.encode([{"role": "user", "content": "<image>\n" + question}])
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ids, rec.id
        new = pred.generate_ids([ids], pred.images([image]), settings)[0]
        with torch.no_grad():
            theirs = llava.generate(**inputs, max_new_tokens=6)[0, len(ids):].tolist()
        assert theirs == new, rec.id
