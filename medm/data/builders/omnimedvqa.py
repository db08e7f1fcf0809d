"""OmniMedVQA (Hu et al. 2024, CVPR): medical multiple-choice VQA over 12 modalities, to medm records.

`medm data build omnimedvqa --src data/OmniMedVQA --out data/omnimedvqa [--access Open-access] [--datasets a,b]`

Source layout (the released `OmniMedVQA` folder; fields as the benchmark's own evaluation code reads them, OpenGVLab
Multi-Modality-Arena `MedicalEval/Question-answering_Score`)::

    OmniMedVQA/QA_information/Open-access/<dataset>.json     (and Restricted-access/)
    OmniMedVQA/Images/<dataset>/...

Each file is a JSON list of questions: `question`, `option_A`, `option_B` (`option_C`, `option_D` when the question
has them), `gt_answer` (the right option's text), `image_path` (relative to the `OmniMedVQA` folder),
`modality_type` (one released file writes `modality`; read the same), `question_type`, and where present
`question_id` and `dataset`, kept. OmniMedVQA is an evaluation set: everything goes to `test.json`.

Output records (ids `omnimedvqa-<question_id>`, else `omnimedvqa-<file stem>-<row>`): the prompt is the benchmark's
(question + "Here are N candidate answers: [...] Only return ..."), the gpt turn the option text (what that prompt
asks for), `answer` the option letter, `options`, `choice_rule: omnimedvqa`, `modality_type`, `question_type`,
`dataset`. Image paths are relative to `--src`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from medm.data.builders._common import SourceError, as_list, check_images, read_json_list, text_field
from medm.data.builders._mc import check_unique, choice_record, option_letter, write_splits
from medm.registry import BUILDER

RULE = "omnimedvqa"
_MAPPED = ("question", "gt_answer", "image_path", "option_A", "option_B", "option_C", "option_D", "modality")


def convert_row(row: Any, index: int, stem: str, where: str) -> dict[str, Any]:
    """One OmniMedVQA question -> a medm record (SourceError names `where` and the field)."""
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected an object, got {type(row).__name__}")
    options = {k[-1]: text_field(row, k, where) for k in ("option_A", "option_B", "option_C", "option_D")
               if row.get(k) is not None}
    if len(options) < 2:
        raise SourceError(f"{where}: needs option_A and option_B")
    answer = option_letter(options, text_field(row, "gt_answer", where), where)
    fields = {k: v for k, v in row.items() if k not in _MAPPED}
    fields["modality_type"] = row.get("modality_type", row.get("modality"))
    fields.setdefault("dataset", stem)
    qid = row.get("question_id")
    rid = f"omnimedvqa-{qid}" if qid is not None else f"omnimedvqa-{stem}-{index}"
    return choice_record(rid, [text_field(row, "image_path", where)], text_field(row, "question", where), options,
                         answer, RULE, "omnimedvqa", "test", fields, target="text")


def convert_file(path: str) -> list[dict[str, Any]]:
    stem = os.path.splitext(os.path.basename(path))[0]
    return [convert_row(row, i, stem, f"{path}, row {i + 1}") for i, row in
            enumerate(read_json_list(path, "OmniMedVQA QA file"))]


@BUILDER.register("omnimedvqa")
def build_omnimedvqa(out: str, src: str, access: Any = "Open-access", datasets: Any = None,
                     check_images_exist: bool = True) -> dict[str, str]:
    """Convert OmniMedVQA under `src` into `out/test.json`.

    Args:
        out: output directory (created).
        src: the `OmniMedVQA` folder (`QA_information/`, `Images/`).
        access: `QA_information` subfolder(s): Open-access (default), Restricted-access, or both comma-separated.
        datasets: file stems to keep (e.g. "ACRIMA,Chest CT Scan"); default all.
        check_images_exist: fail, naming the questions, when an image file is missing.
    """
    files = sorted(f for a in as_list(access, "access")
                   for f in glob.glob(os.path.join(src, "QA_information", str(a), "*.json")))
    keep = {str(d) for d in as_list(datasets, "datasets")}
    if keep:
        files = [f for f in files if os.path.splitext(os.path.basename(f))[0] in keep]
    if not files:
        raise FileNotFoundError(f"no OmniMedVQA QA files under {os.path.join(src, 'QA_information')} "
                                f"(access {access!r}, datasets {datasets!r})")
    records = [r for f in files for r in convert_file(f)]
    check_unique(records, src)
    image_dir = os.path.abspath(src)
    if check_images_exist:
        check_images(records, image_dir, "OmniMedVQA")
    return write_splits(out, {"test": records}, "OmniMedVQA", f"medm data build omnimedvqa --src {src} --out {out}",
                        image_dir, by="modality_type")
