"""Generation scoring during training (`train.eval_task`): at each evaluation the model being trained answers the
first `train.eval_max_samples` validation records with its kind's Predictor (greedy, eval mode, no gradients), and a
medm eval task scores the answers (`medm eval`'s scoring); `MedMTrainer.evaluation_loop` adds the figures as
`eval_<name>` (eval_closed_accuracy, eval_open_recall, eval_rougeL, ...) to the log entry that holds `eval_loss`.

Under DDP or DeepSpeed each rank answers an equal share of the records (the last share padded with repeats: ZeRO-3
needs every rank in every forward pass, and transformers' `generate` then keeps the ranks stepping together), the rows
are gathered, and every rank scores all of them, so every rank logs the same figures and picks the same best
checkpoint. Rank 0 writes each evaluation's answers to `output_dir/eval_predictions/step-N.jsonl` (`medm eval
--task NAME --pred` reads them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from medm.config import ConfigError
from medm.data.annotations import Record
from medm.infer.generate import GenerationSettings, predictor_for
from medm.infer.predictions import error_row, prediction_row
from medm.registry import TASK

PREDICTIONS_DIR = "eval_predictions"


def validation_records(dataset, limit: int) -> tuple[list[Record], str | None]:
    """The first `limit` distinct records (by id, in order) of a validation dataset and its image_dir.

    `dataset`: a medm or qwen-vl kind dataset (its `record(i)`), or a `PackedDataset` around one.
    """
    inner = dataset if hasattr(dataset, "record") else getattr(dataset, "dataset", None)
    if inner is None or not hasattr(inner, "record"):
        raise ConfigError(f"train.eval_task: the validation dataset ({type(dataset).__name__}) holds no records to "
                          "answer")
    records: dict[str, Record] = {}
    for i in range(len(inner)):
        if len(records) == limit:
            break
        rec = inner.record(i)
        records.setdefault(rec.id, rec)
    return list(records.values()), getattr(inner, "image_dir", None)


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GenerationEval:
    """Answers fixed validation records with the model being trained and scores them with an eval task.

    Args:
        task: a registered eval task name (`medm list`: vqa, vqa-rad, slake, report, ...).
        records: the questions, the same at every evaluation; each needs the reference its task scores against.
        image_dir: base directory of the records' relative image / volume paths.
        max_new_tokens: longest answer generated.
        batch_size: records per `generate` call on each rank.
        output_dir: where rank 0 writes `eval_predictions/step-N.jsonl`; None: nowhere.

    Raises:
        ConfigError: no records, or a record without what the task scores against (names the record).
    """

    def __init__(self, task: str, records: Sequence[Record], *, image_dir: str | None = None,
                 max_new_tokens: int = 32, batch_size: int = 8, output_dir: str | None = None):
        self.task = TASK.build(task)
        self.protocol = self.task.check_protocol(None)
        self.records = list(records)
        self.image_dir = image_dir
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.output_dir = output_dir
        if not self.records:
            raise ConfigError("train.eval_task: the validation data holds no records")
        try:  # a record the task cannot score fails now, not at the first evaluation
            self.task.prepare([prediction_row(r, "") for r in self.records], "validation records")
        except ValueError as e:
            raise ConfigError(f"train.eval_task {task!r}: {e}") from e

    def answer(self, model, processing_class) -> list[dict[str, Any]]:
        """One prediction row per record (`medm infer`'s rows), in record order, on every rank."""
        rank, world = _rank_and_world()
        per = math.ceil(len(self.records) / world)
        mine = self.records[rank * per:(rank + 1) * per]
        padded = mine + [self.records[0]] * (per - len(mine))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers stay in it
        training = inner.training
        rows: dict[str, dict[str, Any]] = {}
        try:
            predictor = predictor_for(inner, processing_class, image_dir=self.image_dir)  # puts it in eval mode

            def unreadable(rec: Record, error: Exception) -> None:
                rows[rec.id] = error_row(rec, error)  # scored as unanswered, as `medm eval` does

            for rec, pred in predictor.predict(padded, batch_size=self.batch_size, settings=self.settings,
                                               on_error=unreadable):
                rows[rec.id] = prediction_row(rec, pred)
        finally:
            inner.train(training)
        local = [rows[r.id] for r in mine]
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, local)
            local = [row for part in parts for row in part]
        return local

    def __call__(self, model, processing_class, step: int | None = None) -> dict[str, float]:
        """The task's figures (percentages and counts; the ones the records give no question for are left out)."""
        rows = self.answer(model, processing_class)
        metrics = self.task.score(self.task.prepare(rows, "validation predictions"), self.protocol)
        if self.output_dir and step is not None and _rank_and_world()[0] == 0:
            folder = os.path.join(self.output_dir, PREDICTIONS_DIR)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"step-{step}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
