"""`medm import llava` on checkpoints written by the original LLaVA (haotian-liu/LLaVA c121f04) and LLaVA-Med
(microsoft/LLaVA-Med d406e3f) model classes, and the `llava_v1` / `vicuna_v1` / `mistral_instruct` templates
(tests/interop/fixtures, made by make_llava_fixtures.py in a peer venv; see fixtures/README.md). For every case:
the prompt string is byte-equal to the peer's `conv_templates[mode].get_prompt()`, the ids equal its
`tokenizer_image_token`, the pixels its `process_images`, and the logits are within 1e-4 of its own forward, both
from `load_trained` on the imported directory and from `model.yaml` + `stage.init_from`."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medm.cli import main
from medm.config import load_yaml
from medm.infer.generate import Predictor
from medm.models import build_model
from medm.registry import TEMPLATE
from medm.train.checkpoint import load_init_weights, load_trained

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_ID, IGNORE = -200, -100  # LLaVA's IMAGE_TOKEN_INDEX, IGNORE_INDEX
# case -> options beyond --encoder-path
CASES = {"llava-llama-pad": [], "llava-llama-pretrain": ["--llm-path"], "llavamed-mistral-square": []}
PRESENT = [c for c in CASES if (FIXTURES / c / "expected.json").is_file()]


def _options(case: Path) -> list[str]:
    opts = ["--encoder-path", str(case / "bases" / "clip")]
    if "--llm-path" in CASES[case.name]:
        opts += ["--llm-path", str(case / "bases" / "llm")]
    return opts


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(case, out, model, tokenizer, rebuilt model, its tokenizer) of `medm import llava` (with `--template`)."""
    done = {}

    def get(name, template=None):
        if (name, template) not in done:
            case = FIXTURES / name
            out = tmp_path_factory.mktemp(name) / "imported"
            extra = ["--template", template] if template else []
            assert main(["import", "llava", str(case / "checkpoint"), str(out)] + _options(case) + extra) == 0
            model, tok = load_trained(str(out))
            rebuilt, tok2 = build_model(load_yaml(str(out / "model.yaml")))
            load_init_weights(rebuilt, str(out))
            done[name, template] = (case, out, model.eval(), tok, rebuilt.eval(), tok2)
        return done[name, template]

    return get


def _source_legacy(case: Path) -> bool:
    """The checkpoint tokenizer's `legacy` setting (transformers 4.3x reads a missing key as true)."""
    where = case / "checkpoint" / "tokenizer_config.json"
    where = where if where.is_file() else case / "bases" / "llm" / "tokenizer_config.json"  # projector-only
    return json.loads(where.read_text()).get("legacy", True)


def _assert_only_space_after_eos_differs(tok, ours, theirs, what):
    """A `legacy: false` tokenizer (LLaVA-1.5's) writes no SentencePiece space after a `</s>` inside the text LLaVA
    tokenizes in one piece; medm's imported tokenizer does (docs/migrating.md): the same text but for that space,
    the same ids up to the first `</s>`."""
    eos = tok.eos_token_id
    assert ours != theirs, what  # else the record needs no exemption
    first = theirs.index(eos) + 1
    assert ours[:first] == theirs[:first], what
    text = [tok.decode([t for t in ids if t >= 0], skip_special_tokens=False) for ids in (ours, theirs)]
    assert text[0].replace(tok.eos_token + " ", tok.eos_token) == text[1], what


def _collapse(ids, image_id):
    return [IMAGE_ID if t == image_id else t for i, t in enumerate(ids) if not (t == image_id and i and
                                                                                ids[i - 1] == image_id)]


@pytest.mark.parametrize("name", PRESENT)
def test_llava_prompts_ids_pixels_and_logits(imported, name):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    tensors = load_file(str(FIXTURES / name / "expected.safetensors"))
    image = Image.open(FIXTURES / name / "data" / expected["image"])
    for rec in expected["records"]:
        # The checkpoint's own template (a tokenizer that writes <s> gets it in its chat template, behind the BOS).
        case, out, model, tok, rebuilt, _ = imported(name, rec["template"])
        pred = Predictor(model, tok)
        fmt = pred.format
        rendered = fmt.render(rec["messages"], add_generation_prompt=True)
        if tok.bos_token_id is not None:  # LLaVA's tokenizer puts <s> in front of its prompt string; medm's template
            assert rendered.startswith(tok.bos_token), rec["key"]
            rendered = rendered[len(tok.bos_token):]
        if expected["peer"].startswith("LLaVA-Med") and rec["kind"] == "chat" and rec["template"] != "mistral_instruct":
            # LLaVA-Med's copy of the TWO style writes "</s> " between turns (LLaVA's, which trained them: "</s>").
            assert rendered.replace("</s>", "</s> ") == rec["prompt"], rec["key"]
            continue
        assert rendered == rec["prompt"], rec["key"]
        ids = pred.encode(rec["messages"])
        if rec["kind"] == "chat" and not _source_legacy(case):
            _assert_only_space_after_eos_differs(tok, _collapse(ids, model.config.image_token_id), rec["input_ids"],
                                                 rec["key"])
            continue
        assert _collapse(ids, model.config.image_token_id) == rec["input_ids"], rec["key"]
        pixels = pred.images([image])
        # LLaVA: expand2square (pad) or nothing (square), then CLIPImageProcessor; medm: vision.resize pad / crop.
        torch.testing.assert_close(pixels, tensors["pixel_values"], atol=1e-5, rtol=0)
        theirs = tensors[f"{rec['key']}/logits"]
        assert len(ids) == int(tensors[f"{rec['key']}/seq_len"])  # as many image features as LLaVA inserts
        for which, m in (("load_trained", model), ("model.yaml + stage.init_from", rebuilt)):
            with torch.no_grad():
                logits = m(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
            torch.testing.assert_close(logits[-len(theirs):, :theirs.shape[1]], theirs, atol=1e-4, rtol=0,
                                       msg=lambda m, w=which, k=rec["key"]: f"{name} {k} via {w}: {m}")


@pytest.mark.parametrize("name", PRESENT)
def test_llava_templates_render_training_conversations_byte_exact(imported, name):
    """The full two-turn conversation, answers included, as the peer's conversation.py renders it; medm's labels
    cover exactly the answers and their `</s>`. (LLaVA-Med's copy of the TWO style writes "</s> " between turns,
    LLaVA's training code "</s>": the registered llava_v1 / vicuna_v1 follow LLaVA's, so they are compared there.)"""
    from medm.data.templates import IGNORE_INDEX, ChatFormat

    case, _, _, tok, *_ = imported(name)
    expected = json.loads((case / "expected.json").read_text())
    for mode, want in expected["renders"].items():
        if expected["peer"].startswith("LLaVA-Med") and mode != "mistral_instruct":
            continue
        fmt = ChatFormat(tok, mode)
        assert fmt.render(want["messages"]) == want["text"], mode
        ids, labels = fmt.encode(want["messages"])
        supervised = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        answers = [m["content"] for m in want["messages"] if m["role"] == "assistant"]
        assert supervised.replace(" ", "") == "".join(a + "</s>" for a in answers).replace(" ", ""), mode


@pytest.mark.parametrize("name, mode", [("llava-llama-pad", "llava_v1"), ("llava-llama-pad", "vicuna_v1"),
                                        ("llavamed-mistral-square", "mistral_instruct")])
def test_training_ids_and_labels_equal_llava_preprocess(imported, name, mode):
    """medm's training encoding of a two-turn image conversation equals LLaVA's own dataset code (train.py's
    `preprocess_v1` for llava_v1 / vicuna_v1, `preprocess_llama_2` for mistral_instruct; SentencePiece tokenizers):
    the same ids, the answers and their end (`</s>`; mistral_instruct: " </s>") supervised, nothing else."""
    from medm.data.templates import ChatFormat

    if name not in PRESENT:
        pytest.skip("fixture not generated")
    case, out, model, tok, *_ = imported(name, mode)
    expected = json.loads((case / "expected.json").read_text())
    want = expected["train"][mode]
    ids, labels = ChatFormat(tok, model.config.template).encode(expected["renders"][mode]["messages"])
    ids = [IMAGE_ID if t == model.config.image_token_id else t for t in ids]
    if _source_legacy(case):
        assert ids == want["input_ids"]
        assert labels == want["labels"]
    else:  # the same supervised text: each answer and its </s>
        _assert_only_space_after_eos_differs(tok, ids, want["input_ids"], mode)
        sup = [tok.decode([t for t, lab in zip(i, la) if lab != IGNORE], skip_special_tokens=False)
               for i, la in ((ids, labels), (want["input_ids"], want["labels"]))]
        assert sup[0] == sup[1] and sup[0].count(tok.eos_token) == 2


def test_llava_import_defaults_and_model_yaml(imported):
    """The default template follows the LLM (Llama: llava_v1; Mistral: mistral_instruct, LLaVA-Med's evaluation
    mode); pad / square become vision.resize pad / squash; the select layer and feature are LLaVA's."""
    for name, template, resize, feature, layer in (("llava-llama-pad", "llava_v1", "pad", "patch", -2),
                                                   ("llava-llama-pretrain", "llava_v1", "pad", "cls_patch", -1),
                                                   ("llavamed-mistral-square", "mistral_instruct", "crop", "patch",
                                                    -2)):
        if name not in PRESENT:
            continue
        _, out, model, tok, *_ = imported(name)
        yaml_cfg = load_yaml(str(out / "model.yaml"))
        if tok.bos_token_id is None:
            assert model.config.template == yaml_cfg["template"] == template
        else:  # a SentencePiece Llama / Mistral tokenizer writes <s>: the template sits in its chat template
            assert model.config.template is yaml_cfg["template"] is None
            assert tok.chat_template == "{{- bos_token -}}" + TEMPLATE.get(template).jinja
        assert yaml_cfg["vision"]["resize"] == resize
        assert (yaml_cfg["vision"]["select_feature"], yaml_cfg["vision"]["select_layer"]) == (feature, layer)
        assert yaml_cfg["llm"]["config"]["model_type"] == ("mistral" if "mistral" in name else "llama")


def _copy(case: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(case / "checkpoint", src)
    return src


@pytest.mark.skipif("llava-llama-pad" not in PRESENT, reason="fixture not generated")
def test_tower_from_encoder_path_when_the_checkpoint_has_none(imported, tmp_path):
    """The same checkpoint with its tower weights removed (a release naming the tower only by mm_vision_tower)
    imports the tower from --encoder-path: the same model; without --encoder-path the error says what to pass."""
    from safetensors.torch import save_file

    case, out, model, *_ = imported("llava-llama-pad")
    src = _copy(case, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in state)
    save_file({k: v for k, v in state.items() if ".vision_tower." not in k}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    out2 = tmp_path / "out"
    assert main(["import", "llava", str(src), str(out2)] + _options(case)) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys()
    rows = model.config.image_token_id  # rows past the source vocabulary: medm's media tokens, fresh each import
    assert [k for k in a if not torch.equal(a[k][:rows] if "embed" in k or "lm_head" in k else a[k],
                                            b[k][:rows] if "embed" in k or "lm_head" in k else b[k])] == []
    from medm.interop.llava import import_llava
    from medm.interop.llava_hf import ImportFormatError
    with pytest.raises(ImportFormatError, match=r"mm_vision_tower.*openai/clip-vit-tiny-patch8.*--encoder-path"):
        import_llava(str(src), str(tmp_path / "out3"))


@pytest.mark.skipif("llava-llama-pretrain" not in PRESENT, reason="fixture not generated")
def test_projector_only_checkpoint_needs_llm_path(tmp_path):
    from medm.interop.llava import import_llava
    from medm.interop.llava_hf import ImportFormatError

    case = FIXTURES / "llava-llama-pretrain"
    with pytest.raises(ImportFormatError, match=r"mm_projector\.bin.*--llm-path"):
        import_llava(str(case / "checkpoint"), str(tmp_path / "o"), encoder_path=str(case / "bases" / "clip"))


@pytest.mark.skipif("llava-llama-pad" not in PRESENT, reason="fixture not generated")
@pytest.mark.parametrize("key, value, match", [
    ("mm_patch_merge_type", "spatial_unpad", r"mm_patch_merge_type 'spatial_unpad'.*refused.*flat"),
    ("image_aspect_ratio", "anyres", r"image_aspect_ratio 'anyres' is refused"),
    ("mm_use_im_start_end", True, r"mm_use_im_start_end.*refused"),
    ("mm_projector_type", "identity", r"mm_projector_type 'identity'"),
    ("model_type", "llava_mpt", r"model_type 'llava_mpt'.*llava_llama, llava_mistral"),
])
def test_unsupported_llava_settings_are_refused_plainly(tmp_path, key, value, match):
    from medm.interop.llava import import_llava
    from medm.interop.llava_hf import ImportFormatError

    case = FIXTURES / "llava-llama-pad"
    src = _copy(case, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportFormatError, match=match):
        import_llava(str(src), str(tmp_path / "o"), encoder_path=str(case / "bases" / "clip"))
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif("llavamed-mistral-square" not in PRESENT, reason="fixture not generated")
def test_llava_med_evaluation_path_end_to_end(imported, tmp_path):
    """LLaVA-Med's VQA evaluation on an imported LLaVA-Med (LlavaMistralForCausalLM) checkpoint: `medm infer` with
    the import's default template (mistral_instruct, the conv mode LLaVA-Med's README runs model_vqa.py with) and
    the question as model_vqa.py builds it ("<image>\\n" + the question, no suffix; a record without a placeholder
    gets it in front) generates, greedily, the tokens LLaVA-Med's own model_vqa generation did; `medm eval
    --protocol llava-med` then scores those answers with LLaVA-Med's rules (closed: the answer a substring of the
    prediction; open: the share of answer words found)."""
    from medm.infer.generate import GenerationSettings

    case, out, model, tok, *_ = imported("llavamed-mistral-square")
    expected = json.loads((case / "expected.json").read_text())
    theirs = [r for r in expected["records"] if r["template"] == "mistral_instruct" and r["kind"] == "vqa"]
    assert [r["messages"][0]["content"] for r in theirs] == ["<image>\nWhat is shown in this image?",
                                                              "<image>\nIs there an effusion on the left?"]
    n_new = len(theirs[0]["generated_ids"])
    pred = Predictor(model, tok)
    pixels = pred.images([Image.open(case / "data" / expected["image"])])
    for r in theirs:  # token for token (greedy)
        got = pred.generate_ids([pred.encode(r["messages"])], pixels, GenerationSettings(max_new_tokens=n_new))[0]
        assert got == r["generated_ids"], r["key"]
    # The answer text: medm's decoding of those tokens. (SentencePiece decodes an invalid UTF-8 run of byte tokens,
    # which a random model emits, partly; the tokenizers library replaces the whole run. Real answers decode alike.)
    answers = [pred.decode(r["generated_ids"]) for r in theirs]
    rows = [{"id": "q0", "image": expected["image"], "answer": "yes",
             "conversations": [{"from": "human", "value": "What is shown in this image?"}]},
            {"id": "q1", "image": expected["image"], "answer": answers[1], "answer_type": "OPEN",
             "conversations": [{"from": "human", "value": "<image>\nIs there an effusion on the left?"}]}]
    questions, preds = tmp_path / "questions.jsonl", tmp_path / "preds.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["infer", "--model", str(out), "--data", str(questions), "--image-dir", str(case / "data"),
                 "--out", str(preds), "--max-new-tokens", str(n_new), "--device", "cpu", "--no-progress"]) == 0
    got = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [g["prediction"] for g in got] == answers
    assert answers[0] and "yes" not in answers[0]
    assert main(["eval", "--task", "vqa", "--pred", str(preds), "--protocol", "llava-med", "--bootstrap", "0",
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "llava-med"
    assert (metrics["n_closed"], metrics["n_open"]) == (1, 1)
    assert (metrics["closed_accuracy"], metrics["open_recall"]) == (0.0, 100.0)


@pytest.mark.skipif("llava-llama-pad" not in PRESENT, reason="fixture not generated")
def test_a_336px_clip_tower_from_encoder_path_in_todays_layout(tmp_path):
    """A CLIP tower at 336 px, patch 14 (CLIP-ViT-L/14-336's grid: 576 image tokens), saved by today's transformers
    (no `vision_model.` level) and given by --encoder-path to a checkpoint without tower weights: the medm tower holds
    exactly its weights and the prompt expands to 576 image tokens."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    case = FIXTURES / "llava-llama-pad"
    src = _copy(case, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".vision_tower." not in k}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    clip = tmp_path / "clip336"
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=336, patch_size=14))
    tower.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(clip)
    out = tmp_path / "out"
    assert main(["import", "llava", str(src), str(out), "--encoder-path", str(clip)]) == 0
    model, tok = load_trained(str(out))
    assert model.config.vision["config"]["image_size"] == 336
    mine = {k.removeprefix("vision.model."): v for k, v in model.state_dict().items() if k.startswith("vision.model.")}
    theirs = {k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    ids = Predictor(model.eval(), tok).encode([{"role": "user", "content": "<image>\nWhat is shown?"}])
    assert ids.count(model.config.image_token_id) == 576


@pytest.mark.skipif("llavamed-mistral-square" not in PRESENT, reason="fixture not generated")
def test_mm_vision_tower_as_a_local_directory_needs_no_encoder_path(imported, tmp_path):
    """A checkpoint whose mm_vision_tower is a local CLIP directory (as a training run writes it) imports without
    --encoder-path: config, image processor and weights come from there; the same model as with the option."""
    case, out, *_ = imported("llavamed-mistral-square")
    src = _copy(case, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = str(case / "bases" / "clip")
    (src / "config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "out"
    assert main(["import", "llava", str(src), str(out2)]) == 0
    assert json.loads((out2 / "config.json").read_text())["vision"] == json.loads((out / "config.json").read_text())[
        "vision"]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert [k for k in a if k.startswith("vision.") and not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("hw", [(70, 30), (30, 71), (20, 33), (100, 100)])
def test_crop_resize_frames_images_as_clip_image_processor(hw):
    """`vision.resize: crop` (LLaVA's `square`): the short side resized, the long side floored, centre-cropped, as
    CLIPImageProcessor does, for portrait and landscape images. (Today's processor rounds some pixels one 8-bit
    level apart: at most 1/255/std; a framing error moves whole rows.)"""
    import numpy as np
    from transformers import CLIPImageProcessor

    from medm.models.vision._base import ImagePreprocess

    proc = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    image = Image.fromarray(np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8))
    want = torch.as_tensor(np.asarray(proc(image, return_tensors="np")["pixel_values"][0]))
    got = ImagePreprocess((48, 48), tuple(proc.image_mean), tuple(proc.image_std), "crop")(image)
    assert got.shape == want.shape == (3, 48, 48)
    torch.testing.assert_close(got, want, atol=1.01 / 255 / min(proc.image_std), rtol=0)
    assert (got - want).abs().mean() < 2e-3
