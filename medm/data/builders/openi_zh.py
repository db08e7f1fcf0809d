"""Chinese chest X-ray reports: OpenI-zh (IU X-ray / OpenI reports translated to Chinese, released by XrayGLM and
used by XrayQwen / XrayQwenVL), to medm records.

`medm data build openi-zh --src data/OpenI-zh --out data/openi_zh [--test-ratio 0.1 --seed 0]`

Source layout (github WangRongsheng/XrayGLM `data/Xray/openi-zh.json` + the released X-ray images)::

    OpenI-zh/openi-zh.json      {"annotations": [{"image_id": "162_1", "caption": "<Chinese report>"}, ...]}
    OpenI-zh/images/162_1.png   (XrayGLM's own builders point at ./data/Xray/<image_id>.png)

or a record array as XrayGLM fine-tunes on (`openi-ch-random.json`): `[{"img": ".../162_1.png", "prompt",
"label"}]` (`--annotation` names the file; both shapes are recognised). `image_id` "<study>_<view>" shares its
report with the study's other views.

There is no official split: studies (the part of `image_id` before "_") are shuffled with `--seed` and
`--test-ratio` of them go to `test.json`, the rest to `train.json`, so no study's report is in both. Ids
`openi-zh-<image_id>`; the prompt is XrayGLM's fixed one ("通过这张胸部X光影像可以诊断出什么？", --prompt to
change); the Chinese report is the answer. Score with `medm eval --task report-zh` (ROUGE / BLEU / METEOR by
character).
"""

from __future__ import annotations

import os
import random
from typing import Any

from medm.data.builders._common import SourceError, check_images, read_json, text_field
from medm.data.builders._mc import check_unique, text_record, write_splits
from medm.registry import BUILDER

PROMPT = "通过这张胸部X光影像可以诊断出什么？"


def read_items(path: str, image_folder: str, image_ext: str) -> list[tuple[str, str, str, str | None]]:
    """(image_id, image path relative to src, report, prompt or None) of either file shape."""
    data = read_json(path, "OpenI-zh annotation file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return [(text_field(a, "image_id", f"{path}, annotations[{i}]"),
                 os.path.join(image_folder, a["image_id"] + image_ext),
                 text_field(a, "caption", f"{path}, annotations[{i}]"), None)
                for i, a in enumerate(data["annotations"])]
    if isinstance(data, list):
        out = []
        for i, r in enumerate(data):
            where = f"{path}, row {i + 1}"
            if not isinstance(r, dict):
                raise SourceError(f"{where}: expected an object, got {type(r).__name__}")
            img = text_field(r, "img", where)
            out.append((os.path.splitext(os.path.basename(img))[0], os.path.join(image_folder, os.path.basename(img)),
                        text_field(r, "label", where), r.get("prompt")))
        return out
    raise SourceError(f"{path}: expected {{'annotations': [...]}} or a list of {{img, prompt, label}} records")


@BUILDER.register("openi-zh")
def build_openi_zh(out: str, src: str, annotation: str = "openi-zh.json", image_folder: str = "images",
                   image_ext: str = ".png", test_ratio: float = 0.1, seed: int = 0, prompt: str = PROMPT,
                   check_images_exist: bool = True) -> dict[str, str]:
    """Convert OpenI-zh under `src` into `out/train.json` and `out/test.json`, split by study.

    Args:
        out: output directory (created).
        src: the folder holding the annotation file and the images folder.
        annotation: the annotation file inside `src`.
        image_folder / image_ext: where `<image_id><ext>` images are, inside `src`.
        test_ratio: share of studies that go to test.json.
        seed: the shuffle's seed.
        prompt: the instruction (a record array's own `prompt` wins when it has one).
        check_images_exist: fail, naming the records, when an image file is missing.
    """
    if not 0 < float(test_ratio) < 1:
        raise ValueError(f"test_ratio must be between 0 and 1, got {test_ratio}")
    items = read_items(os.path.join(src, annotation), image_folder, image_ext)
    studies = sorted({iid.split("_")[0] for iid, _, _, _ in items})
    random.Random(int(seed)).shuffle(studies)
    test = set(studies[:max(1, round(float(test_ratio) * len(studies)))])
    result: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for iid, image, report, own_prompt in items:
        split = "test" if iid.split("_")[0] in test else "train"
        result[split].append(text_record(f"openi-zh-{iid}", [image], own_prompt or prompt, report, "openi-zh", split,
                                         {"image_id": iid, "study_id": iid.split("_")[0], "language": "zh"}))
    for records in result.values():
        check_unique(records, os.path.join(src, annotation))
    image_dir = os.path.abspath(src)
    if check_images_exist:
        for records in result.values():
            check_images(records, image_dir, "OpenI-zh")
    return write_splits(out, result, "OpenI-zh (Chinese chest X-ray reports)",
                        f"medm data build openi-zh --src {src} --out {out} --test-ratio {test_ratio} --seed {seed}",
                        image_dir, notes=[f"Split by study: {len(test)} of {len(studies)} studies in test.json "
                                          f"(seed {seed})."])
