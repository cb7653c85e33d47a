"""What bad input raises (`DataError`) and what `skip_bad_rows=True` counts instead (`BadRows`).

The lowest module of `vlm2vec.data`: it imports nothing from the rest of the package. `DataError` itself
lives in `vlm2vec.errors`, below the media readers (`vlm2vec.media`) that raise it too."""

from __future__ import annotations

import warnings
from collections import Counter

from vlm2vec.errors import DataError

__all__ = ["BadRows", "DataError"]


class BadRows:
    """Rows skipped under `skip_bad_rows=True`: counted (by kind), the first few warned about, none silent.

    A trainer logs `count`. DataLoader workers hold their own copies of the objects, so batches also list
    the rows they skipped (`ContrastiveBatch.skipped`, `PreparedBatch.skipped`)."""

    max_warnings = 10

    def __init__(self) -> None:
        self.count = 0
        self.by_kind: Counter[str] = Counter()
        self.messages: list[str] = []  # the first `max_warnings` messages

    def add(self, message: str, kind: str) -> None:
        self.count += 1
        self.by_kind[kind] += 1
        if self.count <= self.max_warnings:
            self.messages.append(message)
            warnings.warn(f"skipping bad row ({self.count} so far): {message}", stacklevel=3)
        elif self.count == self.max_warnings + 1:
            warnings.warn("more bad rows are being skipped; they are counted in BadRows.count", stacklevel=3)

    def __repr__(self) -> str:
        return f"BadRows(count={self.count}, by_kind={dict(self.by_kind)})"
