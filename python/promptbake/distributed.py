"""Baking on several processes: torchrun's environment, who owns which context, the sums every
rank must agree on.

``torchrun --nproc-per-node N ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and a
rendezvous in their environment; ``World.from_env`` joins them (gloo on the CPU, NCCL on CUDA).
Rank r owns the training contexts c with ``c % N == r``: it holds their trajectories and teacher
cache. An optimizer step's micro-batches are the one-process plan (``train.batch_plan``), each
rank computing its own contexts' share; the LoRA gradients are then summed across ranks in one
all-reduce of a flat buffer (data parallel, as DDP does), so every rank takes the same step and
the run equals a one-process run on the same trajectories.

With ``shard`` (``--fsdp``) the decoder layers are sharded with FSDP2 (``fully_shard``): each
rank keeps 1/N of every frozen base weight and LoRA parameter, a layer gathers its weights for
each forward and backward pass, and the LoRA gradients come back summed and sharded. A sharded
layer's forward is a collective, so the ranks' passes must pair up: loops over data ask ``more``
whether any rank has work left, and a rank that has none runs ``idle`` (or a stand-in batch
whose result it drops) until the others finish. Tensors written to disk are gathered whole
first (``full``); read back, they are sharded like the parameter they belong to (``like``).
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
    sharded: bool = False  # the model's layers are sharded over the ranks (FSDP2, ``shard``)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its GPU when there is one (``from_env`` made torchrun's
        ``LOCAL_RANK`` the current device), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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


def shard(model, world: World, device: torch.device | None = None) -> World:
    """Shards ``model``'s decoder layers over the ranks with FSDP2 (``fully_shard``; the layer
    classes are the model's ``_no_split_modules``), each rank's shards on ``device`` (default
    ``world.device``). The embeddings and the LM head stay whole on every rank (frozen, and the
    fused head reads its weight whole), moved to ``device``. Gradients are summed, not averaged,
    over the ranks, as ``sum_gradients`` does. Returns the world marked sharded.

    Under bf16 autocast each gathered fp32 weight is cast to bf16 and autograd keeps that copy
    for the backward pass, so a training step's peak holds a bf16 copy of every layer (a 1.1B
    model on 2 ranks: 6.7 GiB per rank at the peak against 3.5 in fp32). FSDP2's own mixed
    precision (gathering in bf16) would avoid it, but in torch 2.13 on CPU its backward fails
    ("a gradient with dtype BFloat16 to a tensor with grad_dtype Float"): not used."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not world.distributed:
        raise ValueError("--fsdp shards the model over torchrun's ranks, and this is one "
                         "process: launch with torchrun --nproc-per-node N -m promptbake bake "
                         "... --fsdp, or drop --fsdp")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of this {inner.config.model_type} "
                         f"model to shard (it names no _no_split_modules): bake it without "
                         f"--fsdp")
    device = device or world.device
    inside = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    # The rest of the model, whole, where the shards will be, in memory of its own: weights
    # loaded from safetensors map the whole file, and one tensor left on the mapping would keep
    # every page the sharding touched resident (a whole copy of the model per rank).
    with torch.no_grad():
        for module in inner.modules():
            for _, param in module.named_parameters(recurse=False):
                if id(param) not in inside:
                    param.data = param.data.to(device, copy=True)  # the same Parameter: ties hold
            for name, buffer in module.named_buffers(recurse=False):
                if id(buffer) not in inside:
                    setattr(module, name, buffer.to(device, copy=True))
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # The model itself is the root, owning none of its weights: FSDP2 does not free a root's
    # gathered weights after its forward (they would be needed again at once for backward), so
    # the layers must not be roots.
    whole = {p for p in inner.parameters() if id(p) not in inside}
    fully_shard(inner, mesh=mesh, ignored_params=whole)
    for module in (*layers, inner):
        # Summed: the loss is already divided by the global sequence count. A plain SUM (no
        # PREMUL_SUM, which gloo lacks), and no division after it.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return dataclasses.replace(world, sharded=True)


def more(local: bool, world: World) -> bool:
    """Whether any rank has work left (``local``: this one has). Unsharded, every rank goes at
    its own pace and this is ``local``."""
    if not world.sharded:
        return local
    return all_sum([float(local)], world)[0] > 0


def idle(model) -> None:
    """One forward pass of a one-token input, its result dropped: a rank's share of the
    collectives of a sharded model's forward, when it has no work of its own."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, as read from disk) sharded as ``reference`` is; unchanged when the
    reference is not sharded or ``tensor`` is a scalar (an optimizer's step count)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor) or tensor.dim() == 0:
        return tensor
    return distribute_tensor(tensor.to(reference.device, reference.dtype),
                             reference.device_mesh, reference.placements)


def full_lora_state(model) -> dict[str, torch.Tensor] | None:
    """The model's LoRA parameters gathered whole, by their state-dict names, for
    ``save_pretrained(state_dict=...)``; None when nothing is sharded (it saves as usual)."""
    from torch.distributed.tensor import DTensor

    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if not any(isinstance(v, DTensor) for v in state.values()):
        return None
    return {k: full(v) for k, v in state.items()}


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
