"""Where this training process runs: alone, or as one rank of a torchrun job; and on which device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Place:
    ddp: bool
    """Under torchrun (``RANK`` set): a process group, DDP, one share of the rows per rank."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0: the one that logs, evaluates into the log, checkpoints and starts servers."""
        return self.rank == 0
