"""Trajectories y ~ P_theta(. | u, x): sampled from the prompted model, teacher targets recorded.

Each context's prompted prefix is encoded once; its KV cache is copied to the context's samples,
and contexts are decoded together in batches (left-padded). A long start that every prefix
shares (the prompt u) is encoded once for all of them. Eq. 3's teacher at every response
position is the prompted model's next-token distribution at temperature 1, which the sampler
computes anyway, so it is recorded while sampling: training then needs no teacher forward pass.
It is kept either in full (fp16 log-probabilities over the vocabulary) or as the top-k
log-probabilities, the rest of the mass being the tail bucket. Tokens are drawn from that same
distribution at the defaults (temperature 1, top-p 1), which makes the trajectories Eq. 3's
y ~ P(. | u, x); another temperature or top-p draws them from a sharpened or truncated version,
while the targets stay the temperature-1 distribution.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from promptbake import files
from promptbake.decoding import draw, next_step, prefill, preallocate, shared_prefix, top_p_filter
from promptbake.distributed import SINGLE, World, idle, more

CACHE_KINDS = ("full", "topk", "none")


@dataclasses.dataclass
class SamplingConfig:
    """How responses are sampled from the prompted model."""

    samples_per_context: int = 2
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # sequences decoded together

    def validate(self) -> None:
        if self.samples_per_context < 1:
            raise ValueError(f"samples_per_context={self.samples_per_context} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass
class Trajectories:
    """Sampled responses and, per response token, the teacher's distribution it was drawn from.

    ``offsets[i]:offsets[i + 1]`` indexes trajectory i's rows in the target tensors.
    """

    context_index: list[int]
    responses: list[list[int]]
    cache: str = "none"
    full_logprobs: torch.Tensor | None = None  # [tokens, V] fp16
    topk_ids: torch.Tensor | None = None  # [tokens, k] int64
    topk_logprobs: torch.Tensor | None = None  # [tokens, k] fp32

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for r in self.responses:
            out.append(out[-1] + len(r))
        return out

    def tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def by_context(self) -> dict[int, list[int]]:
        """Context index -> its trajectories, in order."""
        out: dict[int, list[int]] = {}
        for k, c in enumerate(self.context_index):
            out.setdefault(c, []).append(k)
        return out

    def rows(self, indices: list[int]) -> torch.Tensor:
        """Target-row indices of the given trajectories, in order."""
        offsets = self.offsets
        return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])

    def select(self, keep) -> Trajectories:
        """The trajectories of the contexts ``keep(c)`` is true for, with their teacher cache;
        context indices stay as they were (a rank's share of a distributed bake)."""
        chosen = [k for k, c in enumerate(self.context_index) if keep(c)]
        rows = self.rows(chosen) if chosen else torch.zeros(0, dtype=torch.long)
        targets = [None if t is None else t[rows]
                   for t in (self.full_logprobs, self.topk_ids, self.topk_logprobs)]
        return Trajectories([self.context_index[k] for k in chosen],
                            [self.responses[k] for k in chosen], self.cache, *targets)

    @classmethod
    def merged(cls, parts: list[Trajectories]) -> Trajectories:
        """Several ranks' trajectories (disjoint contexts, one cache kind) as one, in context
        order: what a one-process bake would hold."""
        order = sorted(((c, p, k) for p, part in enumerate(parts)
                        for k, c in enumerate(part.context_index)), key=lambda x: (x[0], x[1]))
        caches = {part.cache for part in parts}
        if len(caches) != 1:
            raise ValueError(f"cannot merge trajectories with different caches {sorted(caches)}")
        rows = [(parts[p], k) for _, p, k in order]

        def joined(field):
            if getattr(parts[0], field) is None:
                return None
            return torch.cat([getattr(part, field)[part.rows([k])] for part, k in rows])

        return cls([c for c, _, _ in order], [part.responses[k] for part, k in rows],
                   caches.pop(), joined("full_logprobs"), joined("topk_ids"),
                   joined("topk_logprobs"))

    def save(self, path: Path) -> None:
        tensors = {k: v.contiguous() for k, v in (("full_logprobs", self.full_logprobs),
                                                  ("topk_ids", self.topk_ids),
                                                  ("topk_logprobs", self.topk_logprobs))
                   if v is not None}
        # One metadata entry: safetensors writes several in an order that differs between
        # processes, which would give the same samples saved twice two sha256 values.
        meta = {"trajectories": json.dumps({"context_index": self.context_index,
                                            "responses": self.responses, "cache": self.cache})}
        if not tensors:  # safetensors needs at least one tensor
            tensors = {"empty": torch.zeros(0)}
        files.write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path) -> "Trajectories":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if "trajectories" in meta:  # written since 2026-12-07; earlier files hold three entries
            meta = json.loads(meta["trajectories"])
        else:
            meta = {"context_index": json.loads(meta["context_index"]),
                    "responses": json.loads(meta["responses"]), "cache": meta["cache"]}
        tensors = load_file(str(path))
        return cls(context_index=meta["context_index"], responses=meta["responses"],
                   cache=meta["cache"],
                   full_logprobs=tensors.get("full_logprobs"), topk_ids=tensors.get("topk_ids"),
                   topk_logprobs=tensors.get("topk_logprobs"))


@torch.no_grad()
def sample(model, prefixes: list[list[int]], config: SamplingConfig, stop_ids: set[int],
           generator: torch.Generator, cache: str = "topk", topk: int = 64,
           pad_id: int = 0, progress: Callable[[int], None] | None = None,
           world: World = SINGLE,
           stop_when: Callable[[list[int]], bool] | None = None) -> Trajectories:
    """Samples ``config.samples_per_context`` responses per prefix from ``model`` (the prompted
    teacher) and records the teacher's targets; ``progress(n)`` is called as sequences finish.
    ``stop_when(tokens)``, called with a sequence's tokens after each step, ends it when true
    (as a stop token would, the last token kept).
    With a sharded model (``world.sharded``) every rank runs as many forward passes as the
    busiest one, idling when it has nothing left to sample. When every prefix starts with the
    same long run of tokens (a long prompt u before each context), that start is encoded once
    and its cache serves every batch (``decoding.shared_prefix``; not on a sharded model, whose
    ranks hold different prefixes)."""
    config.validate()
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown teacher cache {cache!r}: choose one of {', '.join(CACHE_KINDS)}")
    per = config.samples_per_context
    targets = _Targets(cache, len(prefixes) * per, config.max_new_tokens, topk)
    group = max(1, config.batch_size // per)
    shared = None if world.sharded else shared_prefix(model, prefixes)
    responses: list[list[int]] = []
    start = 0
    while more(start < len(prefixes), world):
        chunk = prefixes[start:start + group]
        responses += _sample_group(model, chunk, config, stop_ids, generator, targets,
                                   first=len(responses), pad_id=pad_id, world=world,
                                   shared=shared, stop_when=stop_when)
        if progress and chunk:
            progress(len(chunk) * per)
        start += group
    traj = Trajectories([i for i in range(len(prefixes)) for _ in range(per)], responses, cache)
    targets.finish(traj)
    return traj


class _Targets:
    """The teacher's recorded distributions, written in place: each sequence owns a slot of
    ``max_new_tokens`` rows in one buffer (pages never written are never allocated), and the
    slots are packed together at the end, so the cache never exists twice in memory."""

    def __init__(self, cache: str, sequences: int, length: int, topk: int):
        self.cache, self.length, self.topk = cache, length, topk
        self.buffers: list[torch.Tensor] = []
        self.sequences = sequences

    def record(self, logp: torch.Tensor, slots: torch.Tensor, step: int) -> None:
        """Stores the rows of ``logp`` ([B, V] log-probabilities) for sequences ``slots`` ([B])
        at response position ``step``."""
        if self.cache == "none":
            return
        if self.cache == "full":
            rows = (logp.to(torch.float16),)
        else:
            top = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)
            rows = (top.indices, top.values)
        if not self.buffers:
            self.buffers = [torch.empty(self.sequences * self.length, r.shape[1], dtype=r.dtype)
                            for r in rows]
        where = (slots * self.length + step).cpu()
        for buffer, r in zip(self.buffers, rows):
            buffer[where] = r.cpu()

    def finish(self, traj: Trajectories) -> None:
        if self.cache == "none" or not self.buffers:
            return
        offsets = traj.offsets
        for i, response in enumerate(traj.responses):  # packing moves rows down only
            start = i * self.length
            if offsets[i] != start:
                for buffer in self.buffers:
                    buffer[offsets[i]:offsets[i + 1]] = buffer[start:start + len(response)].clone()
        packed = [b[:offsets[-1]] for b in self.buffers]
        if self.cache == "full":
            traj.full_logprobs = packed[0]
        else:
            traj.topk_ids, traj.topk_logprobs = packed


def _sample_group(model, prefixes, config: SamplingConfig, stop_ids, generator,
                  targets: _Targets, *, first: int, pad_id: int,
                  world: World = SINGLE, shared=None, stop_when=None) -> list[list[int]]:
    """Responses for a batch of prefixes (sequences ``first``, ``first + 1``, ... in order),
    after their ``shared`` start when there is one (see ``sample``). No prefixes: this rank
    idles through the other ranks' steps (``world.sharded``)."""
    if not prefixes:
        idle(model)
        for _ in range(config.max_new_tokens):
            if not more(False, world):
                break
            idle(model)
        return []
    per = config.samples_per_context
    device = next(model.parameters()).device
    out, mask, positions = prefill(model, prefixes, pad_id, shared)
    # The prefix is encoded once per context; its cache serves every sample of that context.
    kv = preallocate(out.cache, per, config.max_new_tokens)
    logits = out.logits[:, -1].float().repeat_interleave(per, 0)
    mask = mask.repeat_interleave(per, 0)
    position = positions[:, -1:].repeat_interleave(per, 0)

    n = len(prefixes) * per
    alive = list(range(n))  # batch row -> sequence within the group
    tokens: list[list[int]] = [[] for _ in range(n)]
    done = False
    for step in range(config.max_new_tokens):
        if not done:
            logp = torch.log_softmax(logits, dim=-1)
            # Eq. 3's teacher at this position: the prompted model at temperature 1, whatever
            # the temperature and top-p the token is drawn with.
            targets.record(logp, first + torch.tensor(alive), step)
            probs = logp.exp() if config.temperature == 1.0 else \
                torch.softmax(logits / config.temperature, dim=-1)
            drawn = draw(top_p_filter(probs, config.top_p), generator).to(device)
            still = []
            for row, (seq, token) in enumerate(zip(alive, drawn.tolist())):
                tokens[seq].append(token)
                if token not in stop_ids and not (stop_when and stop_when(tokens[seq])):
                    still.append(row)
            done = not still or step + 1 == config.max_new_tokens
        if not more(not done, world):
            break
        if done:  # finished here, still sampling on another rank of a sharded model
            idle(model)
            continue
        out, mask, position, alive = next_step(model, kv, drawn, mask, position, alive, still)
        logits = out.logits[:, -1].float()
    return tokens
