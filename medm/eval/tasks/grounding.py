"""`grounding`: one box per question ("Where is the lesion?"), scored by IoU and Acc@0.5.

Fields read from each prediction row: `prediction` (text with `<box>(x1,y1),(x2,y2)</box>` on the 0-1000 grid, or
Qwen2.5-VL's `{"bbox_2d": [x1, y1, x2, y2]}` in pixels; the first box counts), `answer` (the reference box: 4 pixel
numbers [x1, y1, x2, y2], or text in either format), and `image_size` [width, height], needed for the 0-1000 grid.
A row without `image_size` takes it from its first `image` file (relative paths under `--image-dir`) when that
file exists. A prediction without a box scores IoU 0 and is counted in `n_unparsed`.
"""

from __future__ import annotations

import os

from PIL import Image

from medm.data.annotations import resolve_path
from medm.eval.protocols import score_grounding
from medm.eval.tasks._base import Column, Task, TaskError, row_name
from medm.registry import TASK

PROTOCOL = "box-iou"


@TASK.register("grounding")
class GroundingTask(Task):
    """Box answers against reference boxes: mean IoU and accuracy at IoU >= `threshold`."""

    title = "Grounding"
    protocols = (PROTOCOL,)
    columns = (Column("n", "n", percent=False), Column("acc_at_iou", "Acc@0.5"), Column("mean_iou", "mean IoU"),
               Column("n_unparsed", "no box", percent=False))
    reliance_columns = (Column("acc_at_iou", "Acc@0.5"), Column("mean_iou", "mean IoU"))
    threshold = 0.5

    def prepare(self, rows, where, image_dir=None):
        out = super().prepare(rows, where, image_dir)
        for row in out:
            if row.get("image_size") is None and row.get("image"):
                path = resolve_path(row["image"][0], image_dir)
                if os.path.isfile(path):
                    with Image.open(path) as im:  # reads the header only
                        row["image_size"] = list(im.size)
        return out

    def score(self, rows, protocol):
        try:
            return score_grounding(rows, self.threshold)
        except ValueError:
            # Name the row: score each alone to find the first that fails.
            for i, row in enumerate(rows):
                try:
                    score_grounding([row], self.threshold)
                except ValueError as e:
                    raise TaskError(f"{row_name(row, i)}: {e}") from None
            raise

    def scorer(self, rows, protocol):
        # Each row's IoU once; a resample only re-averages them (the figures of `score_grounding`).
        per_row = [self.score([row], protocol) for row in rows]

        def stat(idx):
            picked = [per_row[i] for i in idx]
            n = len(picked)
            return {"protocol": PROTOCOL, "n": n, "threshold": self.threshold,
                    "n_unparsed": sum(p["n_unparsed"] for p in picked),
                    "mean_iou": sum(p["mean_iou"] for p in picked) / n if n else None,
                    "acc_at_iou": sum(p["acc_at_iou"] for p in picked) / n if n else None}
        return stat

    def protocol_note(self, protocol):
        return (f"box-iou: IoU of the first predicted box with the reference box; Acc@{self.threshold:g} is the "
                f"share with IoU >= {self.threshold:g}; a prediction without a box scores 0.")
