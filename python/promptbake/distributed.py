"""Baking on several processes: torchrun's environment, who owns which context, the sums every
rank must agree on.

``torchrun --nproc-per-node N ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and a
rendezvous in their environment; ``World.from_env`` joins them (gloo on the CPU, NCCL on CUDA).
Rank r owns the training contexts c with ``c % N == r``: it holds their trajectories and teacher
cache. An optimizer step's micro-batches are the one-process plan (``train.batch_plan``), each
rank computing its own contexts' share; the LoRA gradients are then summed across ranks in one
all-reduce of a flat buffer (data parallel, as DDP does), so every rank takes the same step and
the run equals a one-process run on the same trajectories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

ENV_RANK, ENV_WORLD, ENV_LOCAL = "RANK", "WORLD_SIZE", "LOCAL_RANK"


@dataclasses.dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0

    def owns(self, context: int) -> bool:
        return context % self.size == self.rank

    @classmethod
    def from_env(cls, timeout_s: float = 600.0) -> World:
        """The world torchrun describes (``RANK``, ``WORLD_SIZE``), its process group joined;
        without those variables, one process."""
        size = int(os.environ.get(ENV_WORLD, "1"))
        if size <= 1:
            return cls()
        rank = int(os.environ[ENV_RANK])
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get(ENV_LOCAL, rank)))
            dist.init_process_group("nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, size)

    @classmethod
    def current(cls) -> World:
        """The world of an initialised process group, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


SINGLE = World()


def gather(value, world: World) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(world: World):
    """Rank 0 runs the body first (say, to fill a cache the others then read)."""
    if world.rank != 0:
        barrier(world)
    yield
    if world.rank == 0:
        barrier(world)


def check_same(value, world: World, what: str) -> None:
    """Raises on every rank if ``value`` differs between ranks (settings, inputs)."""
    found = gather(value, world)
    differ = [r for r, v in enumerate(found) if v != found[0]]
    if differ:
        barrier(world)  # every rank has its copy before any of them stops
        raise ValueError(f"{what} differ between ranks: rank 0 has {found[0]!r} but rank(s) "
                         f"{', '.join(map(str, differ))} have "
                         f"{', '.join(repr(found[r]) for r in differ)}; start every rank with "
                         f"the same command and files")


def all_sum(values: list[float], world: World) -> list[float]:
    """``values`` summed over the ranks (float64), the same on every rank."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.Tensor], world: World) -> int:
    """Adds every rank's gradients of ``params`` into each rank's, in place, through one flat
    buffer (a parameter without a gradient on some rank counts as zeros there). Returns the
    bytes each rank sent."""
    if not world.distributed or not params:
        return 0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])
    dist.all_reduce(flat)
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at:at + n].view_as(p).to(p.dtype)
        at += n
    return flat.numel() * flat.element_size()


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
