"""``SparseLinear``: an ``nn.Linear`` whose pruned weight is stored compressed and multiplied by
the sparse kernels of ``promptbake.ops.sparse_linear``; ``sparsify`` swaps it in where it is
measured to be faster than dense.
"""

from __future__ import annotations

import importlib
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

# The module, not the function promptbake.ops exports under the same name.
ops = importlib.import_module("promptbake.ops.sparse_linear")

log = logging.getLogger("promptbake")

_BUFFERS = ("bitmap", "values", "row_offsets", "bias")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W kept as row bitmaps plus packed values (see
    ``promptbake.ops.sparse_linear``). Inference only: the weight and bias are buffers, not
    parameters; the gradient flows to x. Build one with ``from_dense``.

    Args:
        dtype: the values' dtype (float32, bfloat16 or float16); x may have any float dtype and
            the output has x's.
        backend: force ``cpp``, ``triton`` or ``torch``; default by device.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 backend: str | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must "
                             f"both be >= 1")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        # Until from_dense or load_state_dict fills it, every weight is pruned.
        words = -(-in_features // ops.WORD_BITS)
        self.register_buffer("bitmap", torch.zeros(out_features, words, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("values", torch.zeros(0, dtype=dtype, device=device))
        self.register_buffer("row_offsets", torch.zeros(out_features + 1, dtype=torch.int64,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None, *,
                   dtype: torch.dtype | None = None, backend: str | None = None) -> SparseLinear:
        """The layer keeping ``linear``'s non-zero weights, or those where ``mask`` is True.

        Args:
            mask: bool ``[out, in]``; kept weights that are zero are stored (and cost) as any other.
            dtype: the values' dtype; default the weight's. bfloat16 halves the bytes read; the
                output then equals a dense layer holding the same rounded weights.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_dense takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        bitmap, values, row_offsets = ops.pack(weight, mask, dtype=dtype)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=values.dtype, device=weight.device, backend=backend)
        layer.bitmap, layer.values, layer.row_offsets = bitmap, values, row_offsets
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the pruned weight (zeros where pruned), in the values' dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight(self) -> Tensor:
        """The dense ``[out, in]`` weight, rebuilt on every access (for code that reads
        ``.weight.dtype`` or ``.shape`` of a linear layer; not for the forward)."""
        return ops.unpack(self.bitmap, self.values, self.row_offsets, self.in_features)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out x in`` weights that are pruned."""
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = name
        self._chosen = {}  # (device, dtype) -> backend, resolved on first use

    def forward(self, x: Tensor) -> Tensor:
        # The packed weight was checked when it was built or loaded (_check); x is checked here,
        # and the backend is chosen once per device and dtype: a decode step calls this often.
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        buffers = self._buffers
        values, bias = buffers["values"], buffers["bias"]
        key = (x.device, x.dtype)
        name = self._chosen.get(key)
        if name is None:
            if x.dtype not in _FLOATS:
                raise ValueError(f"x has dtype {x.dtype}: expected a float dtype")
            if x.device != values.device:
                raise ValueError(f"x is on {x.device} but the layer on {values.device}: move one")
            name = self._chosen[key] = ops.choose_backend(x, values, self._backend)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)} but the layer takes "
                             f"in_features={self.in_features} in the last dimension")
        if (values.requires_grad or (bias is not None and bias.requires_grad)) \
                and torch.is_grad_enabled():
            raise ValueError("SparseLinear does not train its weight or bias (inference "
                             "only): train the dense layer (to_dense()) instead")
        return ops.forward(x, buffers["bitmap"], values, buffers["row_offsets"], bias, name)

    def _apply(self, fn, recurse=True):
        self._chosen = {}  # the values' dtype or device may change
        return super()._apply(fn, recurse)

    def _check(self) -> None:
        ops.check_format(self.bitmap, self.values, self.row_offsets, self.in_features)
        if self.bitmap.shape[0] != self.out_features:
            raise ValueError(f"bitmap has {self.bitmap.shape[0]} rows but out_features="
                             f"{self.out_features}")
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected "
                             f"({self.out_features},)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The number of kept weights differs from layer to layer: take the incoming shapes
        # (and dtypes), then copy, then check the packed weight before the kernel trusts it.
        for name in _BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = self._buffers.get(name)
            if isinstance(incoming, Tensor) and current is not None:
                self._buffers[name] = torch.empty(incoming.shape, dtype=incoming.dtype,
                                                  device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not error_msgs:
            self._check()
            self._chosen = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.3f}, "
                f"dtype={self.values.dtype}")


def sparsify(model: nn.Module, *, batch_size: int = 1, min_speedup: float = 1.05,
             repeats: int = 5, tied: bool = False, backend: str | None = None) -> list[dict]:
    """Replaces, in place, each ``nn.Linear`` with zeros in its weight by a ``SparseLinear``
    where the sparse kernel is measured faster than the dense layer by ``min_speedup``.

    Layers of the same shape, dtype and sparsity (to 1%) are timed together, side by side,
    on a random ``[batch_size, in]`` input: each sample runs every layer of the group once, as
    decoding does, and when the group fits in the CPU's last-level cache a read of twice that
    cache first evicts it, since in a model the other layers pass between two calls of one.

    Args:
        tied: also consider layers whose weight is shared with another module (e.g. an
            ``lm_head`` tied to the embeddings); the sparse copy unties them. Default: leave them.
        repeats: timed samples per contender (after one warm-up); the medians are compared.

    Returns:
        One record per ``nn.Linear``: ``name``, ``shape`` [out, in], ``sparsity``, ``dense_us`` and
        ``sparse_us`` (median per call, None if not timed), ``speedup``, ``chosen`` and ``reason``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if not min_speedup > 0:
        raise ValueError(f"min_speedup={min_speedup} must be > 0 (1.0: any measured gain)")
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1

    records, groups = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        record = {"name": name, "shape": [module.out_features, module.in_features],
                  "sparsity": float((w == 0).sum()) / w.numel(), "dense_us": None,
                  "sparse_us": None, "speedup": None, "chosen": False}
        records.append(record)
        if uses.get(id(w), 1) > 1 and not tied:
            record["reason"] = "tied weight (pass tied=True to include)"
        elif record["sparsity"] == 0.0:
            record["reason"] = "no zeros"
        elif w.dtype not in ops.VALUE_DTYPES:
            record["reason"] = f"dtype {w.dtype} has no sparse kernel"
        else:
            key = (module.out_features, module.in_features, w.dtype, w.device,
                   round(record["sparsity"], 2))
            groups.setdefault(key, []).append((record, module))

    evict = _Evictor()
    with torch.no_grad():
        for (out_f, in_f, dtype, device, sparsity), members in groups.items():
            sparse = [SparseLinear.from_dense(m, backend=backend) for _, m in members]
            dense = [m for _, m in members]
            x = torch.randn(batch_size, in_f, dtype=dtype, device=device)
            fits = sum(m.weight.numel() * m.weight.element_size() for m in dense) < evict.cache
            times = _time_groups({"dense": lambda x=x, layers=dense: [m(x) for m in layers],
                                  "sparse": lambda x=x, layers=sparse: [s(x) for s in layers]},
                                 repeats, evict if fits and device.type == "cpu" else None,
                                 device)
            dense_us = times["dense"] / len(members) * 1e6
            sparse_us = times["sparse"] / len(members) * 1e6
            chosen = dense_us >= min_speedup * sparse_us
            log.info("sparsify: %d x [%d, %d] at %.0f%% sparsity, batch %d: dense %.1f us, "
                     "sparse %.1f us per layer -> %s", len(members), out_f, in_f, 100 * sparsity,
                     batch_size, dense_us, sparse_us, "sparse" if chosen else "dense")
            for (record, module), layer in zip(members, sparse):
                record.update(dense_us=dense_us, sparse_us=sparse_us,
                              speedup=dense_us / sparse_us, chosen=chosen,
                              reason=f"sparse {dense_us / sparse_us:.2f}x dense "
                                     f"({'>=' if chosen else '<'} {min_speedup})")
                if chosen:
                    parent, _, child = record["name"].rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return records


def _time_groups(fns: dict, repeats: int, evict: _Evictor | None,
                 device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if evict is not None:
                evict()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


class _Evictor:
    """Reads twice the last-level cache, so that timed weights start in memory as in decoding."""

    def __init__(self):
        self.cache = last_level_cache_bytes()
        self._buffer = None

    def __call__(self) -> None:
        if self._buffer is None:
            self._buffer = torch.ones(2 * self.cache // 4, dtype=torch.float32)
        self._buffer.add_(1.0)


def last_level_cache_bytes() -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return best or 32 << 20
