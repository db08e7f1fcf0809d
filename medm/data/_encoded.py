"""What encoding a dataset's records found, shared by the conversation and Qwen-VL datasets: records whose text
cannot be encoded exactly (one error after the loop, listing them) and records left with no supervised token
(dropped, with one warning)."""

from __future__ import annotations

import logging

from medm.data.templates import TemplateError


class EncodingLog:
    """Collects a dataset's encoding failures while its samples are built; `finish` reports them.

    Attributes:
        num_dropped: records dropped for having no supervised token within `max_length`.
    """

    def __init__(self) -> None:
        self.errors: list[TemplateError] = []
        self.num_dropped = 0
        self._dropped_ids: list[str] = []

    def failed(self, error: TemplateError) -> None:
        self.errors.append(error)

    def dropped(self, record_id: str) -> None:
        self.num_dropped += 1
        if len(self._dropped_ids) < 5:
            self._dropped_ids.append(record_id)

    def finish(self, num_records: int, max_length: int, logger: logging.Logger) -> None:
        """Raise the collected encoding errors (up to 10 shown), else warn about the dropped records.

        Raises:
            TemplateError: some record cannot be encoded exactly; the message names each (up to 10).
        """
        if self.errors:
            shown = "\n  ".join(str(e) for e in self.errors[:10])
            more = f"\n  ... and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
            raise TemplateError(f"{len(self.errors)} of {num_records} record(s) cannot be encoded exactly:\n  "
                                f"{shown}{more}")
        if self.num_dropped:
            logger.warning("dropped %d of %d record(s) left with no supervised token (no assistant answer within "
                           "max_length=%d), e.g. %s", self.num_dropped, num_records, max_length,
                           ", ".join(repr(i) for i in self._dropped_ids))
