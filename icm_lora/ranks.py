"""This process's place among the processes of a run (Lightning DDP), and the collectives we need.

Lightning initialises ``torch.distributed`` before ``setup`` runs, so ``Ranks.current()`` is all a
data module or callback needs; outside a distributed run it is rank 0 of 1 and every collective is
the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's items of ``items``: every ``world``-th one, starting at ``rank``."""
        return items[self.rank :: self.world]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def close_process_group() -> None:
    """End a distributed run cleanly: every rank waits for the others, then destroys the group.

    Lightning destroys the process group at exit only for NCCL. A gloo group (DDP on CPUs) left to
    interpreter shutdown can abort the process ("terminate called without an active exception",
    exit -6) after the run itself has finished; call this once a CLI command has succeeded on
    every rank. Outside a distributed run it does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
