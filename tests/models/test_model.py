"""The 2D model: parity with transformers' LLaVA, token placement, save/load, generation."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from medm.interop.llava_hf import llava_config, to_llava_state_dict
from medm.models import build_model, load_model, save_model
from medm.models.tiny import tiny_model_config


def _prompt_ids(tok, n_image_tokens, text="Is there a lesion in the upper left?", n_images=1):
    return tok("<image>" * n_image_tokens * n_images + text, return_tensors="pt").input_ids


def _llava_twin(model):
    """transformers' LLaVA holding exactly the medm model's weights (medm.interop's config and weight mapping)."""
    cfg = llava_config(model.config, model.num_image_tokens)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (
        -2, "default", "gelu")
    llava = LlavaForConditionalGeneration(cfg).eval()
    missing, unexpected = llava.load_state_dict(to_llava_state_dict(model), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return llava


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_transformers_llava(family):
    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config(family=family))
    model.eval()
    llava = _llava_twin(model)
    ids = _prompt_ids(tok, model.num_image_tokens)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=px).logits
        ref = llava(input_ids=ids, pixel_values=px).logits
    assert ours.shape == ref.shape == (1, ids.shape[1], len(tok))
    assert (ours - ref).abs().max().item() <= 1e-5


def test_image_features_land_on_image_positions(tiny_model):
    model, tok = tiny_model
    ids = _prompt_ids(tok, model.num_image_tokens)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        embeds, feats, _ = model.embed(ids, px)
        text_embeds = model.get_input_embeddings()(ids)
    mask = ids[0] == model.config.image_token_id
    assert feats.shape == (1, model.num_image_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(embeds[0, mask], feats[0])
    torch.testing.assert_close(embeds[0, ~mask], text_embeds[0, ~mask])


def test_wrong_image_token_count_raises(tiny_model):
    model, tok = tiny_model
    n = model.num_image_tokens
    ids = _prompt_ids(tok, n - 1)
    with pytest.raises(ValueError, match=rf"{n - 1} image tokens.*{n} feature rows"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=rf"{n} image tokens.*0 feature rows"):
        model(input_ids=_prompt_ids(tok, n))


def test_mixed_batch_text_only_and_two_images(tiny_model):
    """Each sample's logits in a right-padded mixed batch equal its logits run alone."""
    model, tok = tiny_model
    n = model.num_image_tokens
    a = tok("What is shown?", return_tensors="pt").input_ids[0]
    b = _prompt_ids(tok, n, "Compare the two scans.", n_images=2)[0]
    px_b = torch.randn(2, 3, 32, 32)
    c = _prompt_ids(tok, n, "Is it normal?")[0]
    px_c = torch.randn(1, 3, 32, 32)
    seqs = [a, b, c]
    T = max(len(s) for s in seqs)
    ids = torch.full((3, T), tok.pad_token_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([px_b, px_c])).logits
        alone = [model(input_ids=a[None]).logits, model(input_ids=b[None], pixel_values=px_b).logits,
                 model(input_ids=c[None], pixel_values=px_c).logits]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(batch[i, : len(s)], alone[i][0], atol=1e-5, rtol=1e-4)


def test_loss_and_backward_reach_every_trainable_part(tiny_model):
    model, tok = tiny_model
    model.train()
    ids = _prompt_ids(tok, model.num_image_tokens)
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.connector, model.llm):
        assert all(p.grad is not None for p in part.parameters())
    # select_layer -2: the encoder's last block and post-norm are unused; everything before gets gradients.
    used = [p for n, p in model.vision.named_parameters() if "layers.1." not in n and "post_layernorm" not in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)


def test_save_then_load_gives_identical_logits(tiny_model, tmp_path):
    model, tok = tiny_model
    save_model(model, tok, str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded, tok2 = load_model(str(tmp_path))
    assert tok2.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert loaded.config.vision == model.config.vision and loaded.config.connector == model.config.connector
    ids = _prompt_ids(tok2, loaded.num_image_tokens)
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=px).logits,
                                   loaded.eval()(input_ids=ids, pixel_values=px).logits, atol=0, rtol=0)


def _greedy_by_hand(model, ids, px, steps):
    ids = ids.clone()
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=px).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_greedy_with_kv_cache_equals_hand_loop(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(1)
    # Sharpen the random LM so greedy picks are far from ties.
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(20)
    ids = _prompt_ids(tok, model.num_image_tokens)
    px = torch.randn(1, 3, 32, 32)
    out = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False, use_cache=True,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 8
    assert torch.equal(out, _greedy_by_hand(model, ids, px, 8))


def test_generate_left_padded_batch_matches_single(tiny_model):
    model, tok = tiny_model
    n = model.num_image_tokens
    a = _prompt_ids(tok, n, "Is there a lesion?")[0]
    b = _prompt_ids(tok, n, "Where is the lesion in this scan of the chest?")[0]
    px = torch.randn(2, 3, 32, 32)
    T = max(len(a), len(b))
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate([a, b]):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
    for i, s in enumerate([a, b]):
        single = model.generate(input_ids=s[None], pixel_values=px[i: i + 1], **kw)
        assert torch.equal(batch[i, T:], single[0, len(s):])
