"""lm-evaluation-harness on a promptbake model: a baked or prompted model as an ``lm_eval`` LM.

``PromptbakeLM`` (registered as the model type ``promptbake``) wraps a model and tokenizer already
in memory, optionally with a system prompt and a framing, and answers the harness's three request
types with promptbake's batched scorer and greedy decoder (``promptbake.modeling`` and
``promptbake.decoding``), so a task scores as ``promptbake.tasks`` scores it. One difference is the
harness's convention, kept so numbers compare with its own HF model: the context's trailing
whitespace (the newline ending a chat template's assistant header) is scored as the first token of
every continuation; it adds the same log-probability to every choice of a question, so the accuracy
is unchanged. ``run_lm_eval`` runs harness tasks on it for users who have their datasets locally
(nothing is downloaded here; a task defined by a local YAML file with ``dataset_path: json`` works
offline). lm-eval is an optional extra: ``pip install "promptbake[eval]"``.

After ``import promptbake.lm_eval_adapter`` the harness also builds it by name:
``lm_eval.simple_evaluate(model="promptbake", model_args="pretrained=DIR,system=...")`` (or
``baked=DIR,strength=0.5``). The ``lm_eval`` command line cannot: it discovers no plugins.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install "
                      "\"promptbake[eval]\"") from err

from promptbake import models
from promptbake.artifact import load_baked
from promptbake.decoding import cut, greedy, stop_strings, stop_token_ids
from promptbake.framing import STUDENT_FRAMINGS, Framing
from promptbake.modeling import continuation_logprobs

log = logging.getLogger("promptbake")


@register_model("promptbake")
class PromptbakeLM(LM):
    """An ``lm_eval`` LM over a causal LM in memory (a PEFT model is called as it stands).

    ``system``: a system prompt put into every chat the harness templates (the harness's own
    ``system_instruction`` wins when both are given); ``framing``: how a chat without one is
    framed (``default``, ``empty``, ``none``: see ``promptbake.framing``). ``max_length``:
    tokens of context kept (the left is cut); default: the model's position limit.
    """

    def __init__(self, model=None, tokenizer=None, *, system: str | None = None,
                 framing: str = "default", batch_size: int | str | None = 16,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 pretrained: str | None = None, baked: str | None = None,
                 strength: float = 1.0, **_ignored):
        super().__init__()
        if model is None:
            model, tokenizer = _load(pretrained, baked, float(strength))
        elif tokenizer is None:
            raise ValueError("PromptbakeLM(model, tokenizer): pass the model's tokenizer too")
        if framing not in STUDENT_FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}: choose one of "
                             f"{', '.join(STUDENT_FRAMINGS)}")
        self.model, self.tokenizer = model, tokenizer
        self.system, self.framing = system or None, framing
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 16
        config = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(tokenizer, model)
        self._device = next(model.parameters()).device

    # -- chat templating (the harness calls this when apply_chat_template is on) -----------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        """The chat as text: with ``system`` (or the harness's system message) as the system
        turn, otherwise framed as ``framing`` says, exactly as ``promptbake.tasks`` frames it."""
        messages = list(chat_history)
        system = self.system
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        framing = Framing(self.tokenizer, system or "unused", self.framing)
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            # A prefilled answer the model continues: the template without the closing of
            # the last turn (what continue_final_message does).
            last = messages.pop()["content"]
            head = framing.teacher_text(messages) if system else framing.student_text(messages)
            return head + last
        return framing.teacher_text(messages, add_generation_prompt) if system else \
            framing.student_text(messages, add_generation_prompt)

    # -- encoding ------------------------------------------------------------------------

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        # Chat-templated contexts already hold their special tokens as text.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as the harness splits them: trailing spaces
        of the context move to the continuation, the whole is encoded at once and the context's
        tokens cut off, so the continuation keeps the tokens it has in the full text."""
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        head = self._encode(context)
        return whole[:len(head)], whole[len(head):]

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that the model's input, context + continuation
        without its last token, fits in max_length tokens."""
        room = self.max_length + 1 - len(continuation)
        if room < 1:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"model's {self.max_length}-token context: raise max_length")
        return context[-room:]

    # -- the three request types --------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        results = self._score(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Requests with the same context (the choices of one question) share its forward pass.
        groups: dict[tuple, list[int]] = {}
        for k, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("an empty continuation has no log-likelihood to compute")
            groups.setdefault(tuple(self._fit(context, continuation)), []).append(k)
        prefixes = [list(c) for c in groups]
        continuations = [[pairs[k][1] for k in ks] for ks in groups.values()]
        scored = continuation_logprobs(self.model, prefixes, continuations, self.pad_id,
                                       self.batch_size)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for ks, found in zip(groups.values(), scored):
            for k, value in zip(ks, found):
                results[k] = value
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity), in windows of max_length tokens that each
        predict new tokens only, conditioned on the prefix token (lm-eval's rolling windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for index, request in enumerate(requests):
            tokens = self._encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id,
                                                    self.max_length, context_len=1):
                pairs.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (value, _) in zip(owner, self._score(pairs)):
            totals[index] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers, cut at the first of the request's stop strings (``until``)."""
        out: list[str | None] = [None] * len(requests)
        settings: dict[tuple, list[int]] = {}
        for k, request in enumerate(requests):
            options = dict(request.args[1] or {})
            if options.get("do_sample") or float(options.get("temperature", 0) or 0) > 0:
                log.warning("promptbake: lm-eval asked for sampling; PromptbakeLM decodes "
                            "greedily, so its answers are deterministic")
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.get("max_gen_toks", self.max_gen_toks))
            settings.setdefault((tuple(until), budget), []).append(k)
        for (until, budget), ks in settings.items():
            room = max(1, self.max_length - budget)  # the answer must fit after the context
            prefixes = [(self._encode(requests[k].args[0]) or [self.prefix_token_id])[-room:]
                        for k in ks]
            stop = stop_strings(self.tokenizer, until)
            answers = greedy(self.model, prefixes, max_new_tokens=budget, stop_ids=self.stop_ids,
                             pad_id=self.pad_id, batch_size=self.batch_size, stop=stop)
            for k, tokens in zip(ks, answers):
                text = cut(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out


def _load(pretrained: str | None, baked: str | None, strength: float):
    """(model, tokenizer) from a model directory (None: the default model) or a baked one."""
    if baked:
        found = load_baked(baked, strength=strength)
        return found.model, found.tokenizer
    model, tokenizer, _ = models.load(pretrained)
    return model, tokenizer


def run_lm_eval(model, tokenizer, tasks, *, system: str | None = None,
                include_path=None, limit: float | None = None, framing: str = "default",
                include_defaults: bool = True, batch_size: int = 16, num_fewshot: int | None = None,
                chat_template: bool = True, log_samples: bool = False,
                bootstrap_iters: int = 1000) -> dict:
    """Runs lm-evaluation-harness tasks on ``model`` and returns the harness's results dict
    (``results[task]["acc,none"]`` and so on; ``samples`` too with ``log_samples``).

    ``tasks``: harness task names or YAML paths; ``include_path``: a directory (or list) of your
    own task YAML files; ``include_defaults=False`` skips indexing the harness's thousands of
    built-in tasks (faster, when all yours are local). ``chat_template``: put every prompt in
    the chat template (with ``system``); without it the harness's raw text is scored and
    ``system`` cannot apply. Datasets must be on disk (or in the datasets cache): nothing is
    downloaded when the environment is offline. ``bootstrap_iters``: resamples for the
    standard errors of metrics without a closed form (accuracy has one); 0 skips them.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if system and not chat_template:
        raise ValueError("system= needs chat_template=True: without the chat template there "
                         "is no system turn to put the prompt in")
    lm = PromptbakeLM(model, tokenizer, system=system, framing=framing, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, apply_chat_template=chat_template,
                              log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    if results is None:
        raise ValueError("lm-evaluation-harness returned no results (a non-zero rank?)")
    return results
