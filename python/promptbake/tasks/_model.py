"""The two model calls every task needs: log-probabilities of given continuations, and greedy
generation. Both are batched and deterministic, and both simply call the model: a PEFT model
with its adapter enabled at some strength is evaluated as it stands."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from promptbake import _lm

log = logging.getLogger("promptbake")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model, prefixes: list[list[int]], continuations: list[list[list[int]]],
                          pad_id: int, batch_size: int = 16,
                          progress: Callable[[int], None] | None = None) -> list[list[tuple]]:
    """For each prefix i and each continuation j of it: (sum of log P(token | prefix, earlier
    continuation tokens), whether every token is the greedy choice).

    ``continuations[i]`` are token lists following ``prefixes[i]`` (a question's choices). A
    prefix goes through the model once per batch and its KV cache serves all of its
    continuations (``_lm.response_logits``). ``batch_size`` counts prefixes; ``progress(n)`` is
    called after each batch with the number of prefixes done in it.
    """
    out: list[list[tuple]] = []
    for start in range(0, len(prefixes), batch_size):
        chunk, conts = prefixes[start:start + batch_size], continuations[start:start + batch_size]
        logits = _lm.response_logits(model, chunk, conts, pad_id)
        logp = torch.log_softmax(logits.double(), dim=-1)  # fp64 sums: ties stay exact ties
        row = 0
        for group in conts:
            scored = []
            for tokens in group:
                rows = logp[row:row + len(tokens)]
                target = torch.tensor(tokens, device=rows.device)
                total = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                scored.append((total, greedy))
                row += len(tokens)
            out.append(scored)
        if progress:
            progress(len(chunk))
    return out


@torch.no_grad()
def greedy(model, prefixes: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
           pad_id: int, batch_size: int = 16,
           stop: Callable[[list[int]], bool] | None = None,
           progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of every prefix (token ids, without the stop token).

    Prefixes are sorted by length and decoded in left-padded batches of ``batch_size``; a row
    leaves its batch as soon as it emits a token of ``stop_ids``, reaches ``max_new_tokens``, or
    ``stop(tokens so far)`` is true (lm-eval's stop strings). Results come back in input order.
    """
    order = sorted(range(len(prefixes)), key=lambda i: (-len(prefixes[i]), i))
    results: list[list[int]] = [[] for _ in prefixes]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, tokens in zip(rows, _greedy_batch(model, [prefixes[i] for i in rows],
                                                 max_new_tokens, stop_ids, pad_id, stop)):
            results[i] = tokens
        if progress:
            progress(len(rows))
    return results


def _greedy_batch(model, prefixes, max_new_tokens, stop_ids, pad_id, stop):
    device = _device(model)
    ids, mask, positions = _lm.left_padded(prefixes, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
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
        out, mask, position, alive = _lm.next_step(model, cache, chosen, mask, position, alive,
                                                   still)
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
