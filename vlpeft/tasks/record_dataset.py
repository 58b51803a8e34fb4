"""The base of the single-file task datasets: loaded records, the bad-input policy that loaded them, and an
optional image transform applied when an item is read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from torch.utils.data import Dataset

from vlpeft.tasks.bad_input import BadInputPolicy

__all__ = ["RecordDataset"]

R = TypeVar("R")


class RecordDataset(Dataset, Generic[R]):
    """``records`` in file order; subclasses turn ``records[i]`` into the item dict in ``__getitem__``."""

    def __init__(self, records: Sequence[R], policy: BadInputPolicy,
                 image_transform: Callable[[Any], Any] | None = None) -> None:
        self.records: list[R] = list(records)
        self.policy = policy
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.records)
