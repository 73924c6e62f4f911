"""What every track's counts share: the :class:`Counts` protocol and the registry of kinds."""
from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ...errors import DataError


class Counts(Protocol):
    """What every track's counts share, so the runner, resume, torchrun and the statistics
    never look inside them (DESIGN.md "Tracks as first-class parts").

    * ``update(...)`` counts one item (an image, a referring sample); ``compute()`` summarises.
    * ``additive()``: int64 tensor on the device holding everything the summary needs; counts of
      disjoint shards add up elementwise, so torchrun all_reduces it (exact).
    * ``per_item``: int64 [items, ...] CPU rows in update order, for the bootstrap, paired
      compare and the sidecar; ``rows_agree()`` says whether they sum to ``additive()``.
    * ``state_dict()`` holds ``kind``, ``num_items``, ``additive`` and ``per_item`` (plain values
      and CPU tensors: ``torch.load(weights_only=True)`` reads it); ``from_state`` inverts it.
    """

    kind: ClassVar[str]

    @property
    def num_items(self) -> int: ...

    @property
    def per_item(self) -> Tensor: ...

    def additive(self) -> Tensor: ...

    def rows_agree(self) -> bool: ...

    def merge(self, other: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "Counts": ...

    def compute(self) -> Any: ...


COUNTS_KINDS: dict[str, type] = {}  # kind -> counts class, for saved states (register_counts)


def register_counts(cls: type) -> type:
    """Class decorator: make ``cls`` loadable from a saved state by its ``kind``."""
    if cls.kind in COUNTS_KINDS:
        raise RuntimeError(f"counts kind '{cls.kind}' is registered twice")
    COUNTS_KINDS[cls.kind] = cls
    return cls


def counts_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> Counts:
    """The counts a :meth:`Counts.state_dict` describes; DataError for an unknown or damaged state."""
    kind = state.get("kind", "mmseg-iou") if isinstance(state, dict) else None  # older states lack it
    if kind not in COUNTS_KINDS:
        raise DataError(f"saved counts of kind {kind!r} are not one of {sorted(COUNTS_KINDS)}")
    return COUNTS_KINDS[kind].from_state(state, device)
