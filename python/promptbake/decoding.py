"""Decoding: token draws, batched incremental steps, and KV caches that grow in place.

What the samplers and generators use: ``trajectories.sample`` (the prompted model's responses,
many samples per context), ``greedy`` (the task suite's answers, with stop strings) and
``Conversations`` (multi-turn conversations whose caches are kept from turn to turn, for
drift). Token draws invert the CDF with one uniform per row, so a seeded generator gives the
same tokens on any backend.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from promptbake import modeling
from promptbake.modeling import left_padded, right_padded

log = logging.getLogger("promptbake")


def next_step(model, cache, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
              alive: list, still: list[int]):
    """One step of batched incremental decoding: the rows not in ``still`` (finished) leave the
    batch and the cache, then the kept rows' chosen ``tokens`` are fed. ``alive`` maps batch rows
    to the caller's sequences. Returns (model output, mask, position, alive) for the next step."""
    if len(still) < len(alive):
        keep = torch.tensor(still, device=tokens.device)
        cache.batch_select_indices(keep)
        tokens, mask, position = tokens[keep], mask[keep], position[keep]
        alive = [alive[r] for r in still]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    position = position + 1
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                cache=cache, use_cache=True)
    return out, mask, position, alive


def stop_token_ids(tokenizer, model) -> set[int]:
    """End of sequence and end of turn: where a response stops."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` ([B, V]) with everything outside the top-p nucleus set to zero (not
    renormalised: ``draw`` does not need it)."""
    if top_p >= 1.0:
        return probs
    # The nucleus is found among the k most likely tokens, k growing fourfold until their mass
    # reaches top_p (then no token past them can be in it), row by row: a row is done once its
    # top k hold the nucleus, so one nearly flat row does not make every row sort its whole
    # vocabulary. Sorting SmolLM2's 49k vocabulary for 32 rows took 57 ms on 2 cores, the top
    # 256 of it 2.8 ms, and a nucleus is usually far smaller than the vocabulary.
    vocab = probs.shape[-1]
    out = torch.zeros_like(probs)
    rows = torch.arange(probs.shape[0], device=probs.device)
    k = min(64, vocab)
    while rows.numel():
        part = probs if rows.numel() == probs.shape[0] else probs[rows]
        top, order = part.topk(k, dim=-1) if k < vocab else part.sort(dim=-1, descending=True)
        mass = top.cumsum(-1)  # the sums a full sort's cumsum gives over these first k tokens
        done = mass[:, -1] >= top_p if k < vocab else torch.ones_like(rows, dtype=torch.bool)
        top[mass - top >= top_p] = 0.0  # mass strictly above a token; the first always stays
        if part is probs and bool(done.all()):  # the usual case: every row done at once
            return out.scatter_(-1, order, top)
        out[rows[done]] = out.new_zeros(int(done.sum()), vocab).scatter_(-1, order[done],
                                                                         top[done])
        rows, k = rows[~done], min(4 * k, vocab)
    return out


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` ([B, V], rows need not sum to one) by inverting the CDF
    with one uniform per row: the law of ``torch.multinomial``, without its V exponentials."""
    cdf = probs.double().cpu().cumsum_(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64)
    # right=True: a token with zero probability never holds the first cdf value above u.
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return drawn.squeeze(1).clamp_(max=probs.shape[1] - 1)


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each new step into a buffer sized for the whole response,
    instead of concatenating (a copy of the whole cache per step and layer)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        batch, heads, length, dim = keys.shape
        self._buffers = []
        for states in (keys, values):
            buffer = states.new_empty(batch, heads, length + room, dim)
            buffer[:, :, :length] = states
            self._buffers.append(buffer)
        self.length = length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = (b[:, :, :self.length] for b in self._buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._buffers[0].shape[2]:
            raise RuntimeError("the preallocated KV cache is full")  # sample() sizes it exactly
        self._buffers[0][:, :, self.length:end] = key_states
        self._buffers[1][:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._buffers = [b[indices] for b in self._buffers]
        self._views()


def preallocate(cache, repeats: int, room: int):
    """The prefix cache with each row repeated ``repeats`` times (one per sample) and room for
    ``room`` more tokens, in preallocated layers."""
    layers = cache.layers
    if not all(type(layer) is DynamicLayer for layer in layers):
        cache.batch_repeat_interleave(repeats)  # sliding-window or other layers: keep theirs
        return cache
    cache.layers = [PreallocatedLayer(layer.keys.repeat_interleave(repeats, 0),
                                       layer.values.repeat_interleave(repeats, 0), room)
                    for layer in layers]
    return cache


SHARED_PREFIX = 64  # tokens all prefixes must share before their common start is encoded once


@torch.no_grad()
def greedy(model, prefixes: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
           pad_id: int, batch_size: int = 16,
           stop: Callable[[list[int]], bool] | None = None,
           progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of every prefix (token ids, without the stop token).

    Prefixes are sorted by length and decoded in left-padded batches of ``batch_size``; a row
    leaves its batch as soon as it emits a token of ``stop_ids``, reaches ``max_new_tokens``, or
    ``stop(tokens so far)`` is true (lm-eval's stop strings). Results come back in input order.
    When every prefix starts with the same ``SHARED_PREFIX`` tokens or more (a long prompt before
    each question), that start goes through the model once and its KV cache serves every batch;
    each row then reads the shared start, its own tokens (left-padded: padding sits between the
    two, masked out) and its answer, at the positions it would have alone.
    """
    order = sorted(range(len(prefixes)), key=lambda i: (-len(prefixes[i]), i))
    results: list[list[int]] = [[] for _ in prefixes]
    shared = shared_prefix(model, prefixes)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, tokens in zip(rows, _greedy_batch(model, [prefixes[i] for i in rows],
                                                 max_new_tokens, stop_ids, pad_id, stop, shared)):
            results[i] = tokens
        if progress:
            progress(len(rows))
    return results


def shared_prefix(model, prefixes: list[list[int]]):
    """(length, KV cache) of the start every prefix shares, or None when it is short. At least
    one token of each prefix is left out of it, so every row has tokens of its own to feed."""
    length = modeling.common_start(prefixes)
    if length < SHARED_PREFIX:
        return None
    first = prefixes[0]
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([first[:length]], device=device), use_cache=True,
                logits_to_keep=1)
    return length, out.cache


def prefill(model, prefixes: list[list[int]], pad_id: int, shared=None):
    """(model output with its cache, mask, positions) of one left-padded batch of prefixes,
    the next token's logits at the last column; after ``shared`` (``shared_prefix``), when it
    holds the start every prefix shares, only each prefix's own tokens go through the model.
    A prefix given more than once (the same request sampled several times) is encoded once."""
    device = next(model.parameters()).device
    first_of = {}
    where = [first_of.setdefault(tuple(p), len(first_of)) for p in prefixes]
    if len(first_of) < len(prefixes):
        out, mask, positions = prefill(model, [list(p) for p in first_of], pad_id, shared)
        rows = torch.tensor(where, device=device)
        out.cache.batch_select_indices(rows)
        out.logits = out.logits[rows]
        return out, mask[rows], positions[rows]
    if shared is None:
        ids, mask, positions = left_padded(prefixes, pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        return out, mask, positions
    length, common = shared
    cache = copy.deepcopy(common)
    cache.batch_repeat_interleave(len(prefixes))
    ids, own_mask, own_positions = left_padded([p[length:] for p in prefixes], pad_id, device)
    mask = torch.cat([torch.ones(len(prefixes), length, dtype=own_mask.dtype, device=device),
                      own_mask], dim=1)
    positions = own_positions + length
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out, mask, positions


def _greedy_batch(model, prefixes, max_new_tokens, stop_ids, pad_id, stop, shared=None):
    """``greedy`` on one left-padded batch (after a shared start, when ``shared`` holds one)."""
    out, mask, positions = prefill(model, prefixes, pad_id, shared)
    cache = out.cache
    position = positions[:, -1:]
    alive = list(range(len(prefixes)))  # batch row -> prefix
    tokens: list[list[int]] = [[] for _ in prefixes]
    for step in range(max_new_tokens):
        chosen = out.logits[:, -1].float().argmax(-1)
        still = []
        for row, (i, token) in enumerate(zip(alive, chosen.tolist())):
            if token in stop_ids:
                continue
            tokens[i].append(token)
            if not (stop and stop(tokens[i])):
                still.append(row)
        if not still or step + 1 == max_new_tokens:
            break
        out, mask, position, alive = next_step(model, cache, chosen, mask, position, alive, still)
    return tokens


def stop_strings(tokenizer, until) -> Callable[[list[int]], bool] | None:
    """``greedy``'s ``stop``: true once the decoded answer holds one of the strings ``until``
    (lm-eval's stop strings); None without any."""
    until = [u for u in until if u]
    if not until:
        return None
    longest = max(len(u) for u in until)

    def stop(tokens: list[int]) -> bool:
        # Only the tail can hold a stop string that the newest token completed.
        tail = tokenizer.decode(tokens[-(longest + 8):], skip_special_tokens=True)
        return any(u in tail for u in until)
    return stop



def cut(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text



class Conversations:
    """Rows of conversations decoded together; each row's KV cache is kept across turns.

    ``tokens[r]`` are row r's tokens whose keys and values are in the cache, at columns
    ``columns[r]``; every other column of the row is masked out. Position ids count a row's real
    tokens, so holes change nothing the model computes.
    """

    compact_fraction = 0.25  # compact the cache when more than this share of it is holes

    def __init__(self, model, rows: int, pad_id: int, stop_ids: set[int], reuse: bool):
        self.model, self.rows, self.pad_id, self.stop_ids = model, rows, pad_id, stop_ids
        self.reuse = reuse
        self.inner = modeling.inner(model)
        config = self.inner.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            log.warning("promptbake: %s uses sliding-window attention, whose window counts cache "
                        "columns: the masked-out columns that batched conversations leave in the "
                        "cache shrink its window, so late turns see less history than they would "
                        "alone (use conversations=1 and reuse_cache=False for exact results)",
                        config.model_type)
        self.device = self.inner.get_output_embeddings().weight.device
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0,
                      "forward_calls": 0, "mismatches": 0, "compactions": 0}
        self._reset()

    def _reset(self) -> None:
        self.cache = None
        self.mask = torch.zeros(self.rows, 0, dtype=torch.long, device=self.device)
        self.tokens: list[list[int]] = [[] for _ in range(self.rows)]
        self.columns: list[list[int]] = [[] for _ in range(self.rows)]

    @torch.no_grad()
    def respond(self, contexts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, generator: torch.Generator) -> list[list[int]]:
        """Each row's response to its full context ``contexts[r]`` (token ids ending with the
        assistant header), the stop token included when one was drawn."""
        if not self.reuse:
            self._reset()
        chunks = []
        for r, ids in enumerate(contexts):
            keep = 0
            cached = self.tokens[r]
            while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
                keep += 1
            if keep < len(cached):  # the history re-renders differently: mask what disagrees
                self.stats["mismatches"] += 1
                self.mask[r, self.columns[r][keep:]] = 0
                del self.tokens[r][keep:], self.columns[r][keep:]
            self.stats["reused_tokens"] += keep
            self.stats["prefill_tokens"] += len(ids) - keep
            chunks.append(ids[keep:])
        fresh = self.cache is None
        if not fresh:
            self._compact()
            self._reserve(max(len(c) for c in chunks) + max_new_tokens)
        logits = self._append(chunks)
        if fresh:
            self._reserve(max_new_tokens)
        out: list[list[int]] = [[] for _ in range(self.rows)]
        alive = set(range(self.rows))
        for step in range(max_new_tokens):
            drawn = self._pick(logits, temperature, top_p, generator).tolist()
            for r in sorted(alive):
                out[r].append(drawn[r])
                if drawn[r] in self.stop_ids:
                    alive.discard(r)
            if not alive or step + 1 == max_new_tokens:
                break
            logits = self._append([[drawn[r]] if r in alive else [] for r in range(self.rows)])
        self.stats["generated_tokens"] += sum(len(o) for o in out)
        return out

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float,
              generator: torch.Generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / temperature, dim=-1)
        return draw(top_p_filter(probs, top_p), generator)

    def _append(self, chunks: list[list[int]]) -> torch.Tensor:
        """Feeds each row its new tokens (right-padded into one block, the padding masked out)
        and returns the logits ``[rows, V]`` after each row's last new token (undefined for rows
        that got none)."""
        width = max(len(c) for c in chunks)
        ids, chunk_mask = right_padded([c or [self.pad_id] for c in chunks], self.pad_id,
                                           self.device)
        for r, c in enumerate(chunks):
            if not c:
                chunk_mask[r] = 0
        start = self.mask.shape[1]
        positions = torch.tensor([[len(self.tokens[r]) + i for i in range(width)]
                                  for r in range(self.rows)], device=self.device)
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        # Every padding query sees at least its row's earlier real tokens (or the chunk's first
        # one), so no attention row is fully masked.
        out = self.inner.base_model(input_ids=ids, attention_mask=self.mask,
                                    position_ids=positions, cache=self.cache,
                                    use_cache=True)
        self.cache = out.cache
        self.stats["forward_calls"] += 1
        last = torch.tensor([max(len(c), 1) - 1 for c in chunks], device=self.device)
        hidden = out.last_hidden_state[torch.arange(self.rows, device=self.device), last]
        for r, c in enumerate(chunks):
            self.tokens[r] += c
            self.columns[r] += range(start, start + len(c))
        return modeling.finish_logits(self.inner.config,
                                      self.inner.get_output_embeddings()(hidden)).float()

    def _layers(self):
        """The cache's layers when they are plain key/value tensors this class can rearrange
        (not sliding-window ones, whose window would count the holes), else None."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(type(layer) not in (DynamicLayer, PreallocatedLayer)
                                 for layer in layers):
            return None
        return layers

    def _reserve(self, room: int) -> None:
        """Moves the cache into buffers with ``room`` free columns, so that the turn's tokens are
        written in place instead of concatenated (a copy of the whole cache per step and layer,
        which dominates decoding once a conversation is long)."""
        layers = self._layers()
        if layers is not None:
            self.cache.layers = [PreallocatedLayer(layer.keys, layer.values, room)
                                 for layer in layers]

    def _compact(self) -> None:
        """Drops the masked-out columns when they are more than ``compact_fraction`` of the cache:
        each row's real tokens move to the front (attention over holes costs as much as over
        tokens)."""
        total = self.mask.shape[1]
        longest = max(len(t) for t in self.tokens)
        layers = self._layers()
        if layers is None or total == 0 or total - longest <= self.compact_fraction * total:
            return
        index = torch.zeros(self.rows, longest, dtype=torch.long, device=self.device)
        mask = torch.zeros(self.rows, longest, dtype=torch.long, device=self.device)
        for r, cols in enumerate(self.columns):
            index[r, :len(cols)] = torch.tensor(cols, dtype=torch.long, device=self.device)
            mask[r, :len(cols)] = 1
        gathered = []
        for layer in layers:
            pair = []
            for states in (layer.keys, layer.values):  # [rows, heads, columns, head_dim]
                where = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                pair.append(states.gather(2, where))
            gathered.append(PreallocatedLayer(*pair, room=0))
        self.cache.layers = gathered
        self.mask = mask
        self.columns = [list(range(len(c))) for c in self.columns]
        self.stats["compactions"] += 1


def response_text(tokenizer, tokens: list[int], stops: set[int]) -> str:
    """The text of a response, without its stop token and special tokens."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()

