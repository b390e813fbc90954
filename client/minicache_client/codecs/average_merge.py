"""`average`: both layers of a pair restored as their plain mean (the paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from minicache_client.codecs.merged_pair import MergedPair


@dataclass
class AverageMerge(MergedPair):
    name: ClassVar[str] = "average"

    def merge(self, x: Any, y: Any, originals: Any, first_token: int) -> Any:
        return (x + y) * 0.5

    def expand(self, shared: Any, prepared: Any, which: int, start: int, end: int) -> Any:
        return shared
