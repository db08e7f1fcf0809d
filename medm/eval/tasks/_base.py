"""The small base every evaluation task shares: how its questions are read, how predictions are checked, scored and
broken down, and what its report says."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medm.data.annotations import Record, load_records
from medm.data.jsonlist import read_json_list


class TaskError(ValueError):
    """Predictions or a source file a task cannot use; the message names the file and the row id."""


@dataclass(frozen=True)
class Breakdown:
    """A prediction field whose values split the questions into reported groups.

    Attributes:
        key: the field of the prediction rows (`question_type`, `image_organ`, ...).
        label: how the report names it ("question type").
        sep: values holding several labels ("PRES, POS" with sep ",") count in each label's group.
    """

    key: str
    label: str
    sep: str | None = None


@dataclass(frozen=True)
class Column:
    """One metric shown in the report table: a key of the task's metrics and its header."""

    key: str
    header: str
    percent: bool = True  # formatted with two decimals; otherwise an integer count


def row_name(row: dict[str, Any], index: int) -> str:
    return f"row {index + 1} (id {row['id']!r})" if "id" in row else f"row {index + 1}"


def read_source_rows(path: str, what: str) -> list[Any]:
    """A benchmark's published JSON list file; errors name the file, line and column."""
    return read_json_list(path, what=f"{what} file", items=f"{what} questions", jsonl=False, error=TaskError)


class Task:
    """One benchmark or kind of task. Subclasses set the class attributes and implement `score`.

    Attributes:
        title: the report's heading ("VQA-RAD").
        protocols: the protocol names `score` accepts; the first is the default.
        columns: the metrics of the report table, in order.
        reliance_columns: the metrics compared with and without the image (`medm eval --blank`).
        breakdowns: fields the report groups by, each shown when some prediction has it.
        notes: sentences every report of this task states (e.g. how the benchmark's split was made).
        source_layout: one line describing the published file `load_source` reads; None when the task reads
            medm records only (`medm infer --layout NAME` offers the tasks that have one).
    """

    title: str = ""
    protocols: tuple[str, ...] = ()
    columns: tuple[Column, ...] = ()
    reliance_columns: tuple[Column, ...] = ()
    breakdowns: tuple[Breakdown, ...] = ()
    notes: tuple[str, ...] = ()
    source_layout: str | None = None

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    # ---- questions --------------------------------------------------------------------------------------------
    def load_source(self, path: str) -> list[Record]:
        """The questions of the benchmark's published file as inference records (answer and fields kept)."""
        raise TaskError(f"task {self.name!r} reads medm records only (no published layout of its own)")

    def load_records(self, path: str, layout: str = "records") -> list[Record]:
        """`layout` "records": a medm / LLaVA / ShareGPT file; the task's name: its published layout."""
        if layout == "records":
            return load_records(path)
        if layout != self.name:
            raise ValueError(f"task {self.name!r} reads layout 'records' or {self.name!r}, not {layout!r}")
        return self.load_source(path)

    # ---- predictions ------------------------------------------------------------------------------------------
    def check_protocol(self, protocol: str | None) -> str:
        """`protocol`, or the default when None; an error lists the accepted ones."""
        if protocol is None:
            return self.protocols[0]
        if protocol not in self.protocols:
            raise ValueError(f"task {self.name!r} has no protocol {protocol!r}; known: {', '.join(self.protocols)}")
        return protocol

    def prepare(self, rows: list[dict[str, Any]], where: str, image_dir: str | None = None) -> list[dict[str, Any]]:
        """Check that every row has what scoring needs and return normalised copies.

        The base requires `prediction` (text) and `answer` in every row; errors name `where` and the row id. An
        error line of `medm infer` (`error` instead of `prediction`) is kept as an empty answer marked
        `unanswered`.
        """
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row.get("prediction"), str) and "error" in row:
                # `medm infer` could not read this record's media: unanswered, scored as an empty answer.
                row = {**row, "prediction": "", "unanswered": True}
            if not isinstance(row.get("prediction"), str):
                raise TaskError(f"{where}: {row_name(row, i)} has no text 'prediction'")
            if row.get("answer") is None:
                raise TaskError(f"{where}: {row_name(row, i)} has no 'answer' (the reference); task {self.name!r} "
                                "scores against it (records need an `answer` or a final gpt turn)")
            out.append(dict(row))
        return out

    def score(self, rows: list[dict[str, Any]], protocol: str) -> dict[str, Any]:
        """Flat metrics of prepared rows: percentages, counts, and `protocol`."""
        raise NotImplementedError

    def scorer(self, rows: list[dict[str, Any]], protocol: str) -> Callable[[Sequence[int]], dict[str, Any]]:
        """`indices -> metrics` of the prepared rows at those indices (repeats allowed), for the bootstrap
        (`medm.eval.bootstrap`). The default re-scores the selected rows; tasks whose rows score independently
        override it to score each row once and only re-aggregate."""
        return lambda idx: self.score([rows[i] for i in idx], protocol)

    def protocol_note(self, protocol: str) -> str:
        """One sentence saying how `protocol` scores an answer."""
        return ""
