"""Which rank does what: `guidance` groups of `sequence` ranks each (world = guidance x sequence). Group g holds
ranks g*sequence ... g*sequence + sequence - 1, runs every guidance-th pass of a step (split over its ranks by
sequence parallelism) and its first rank sends the predictions back."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    guidance: int = 1
    sequence: int = 1

    def __post_init__(self):
        if self.guidance < 1 or self.sequence < 1:
            raise ValueError(f"guidance and sequence parallel sizes must be >= 1, got {self.guidance}, {self.sequence}")

    @property
    def world(self) -> int:
        return self.guidance * self.sequence

    def group_of(self, rank: int) -> int:
        return rank // self.sequence

    def group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.sequence, (group + 1) * self.sequence))

    def is_leader(self, rank: int) -> bool:
        return rank % self.sequence == 0

    def passes_of(self, group: int, names) -> list[str]:
        """Pass names (in plan order) that `group` runs: round robin, so 3 passes on 3 groups run at once."""
        return list(names)[group::self.guidance]
