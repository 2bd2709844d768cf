"""Generation with ONNX Runtime from an exported graph (see ``graph.py`` for its inputs).

The KV cache stays with the caller between steps: each step feeds the previous step's
``present`` arrays back as ``past``. Plain numpy feeds are used: keeping the cache in OrtValues
bound through ``IOBinding`` measured no faster on the CPU provider (int8 SmolLM2, 800 decode
steps each, interleaved: p50 125 ms with numpy feeds, 128 ms with IOBinding, on a busy 2-core
machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from promptbake.export.graph import INPUTS, prefill_feed

log = logging.getLogger("promptbake")


class OnnxLoadError(ValueError):
    """An ONNX file cannot be used for generation; the message says why and what to do."""


@dataclasses.dataclass
class Generation:
    """Tokens generated for each prompt and how long it took.

    ``tokens[i]``: the new tokens of prompt i, ending with the EOS token that stopped it, if
    one did. ``prefill_seconds``: time to the first token (the prompt's forward pass and the
    choice of the first token). ``step_seconds``: one entry per later token (a decode step).
    ``logits``: with ``return_logits``, the [batch, vocab] fp32 logits each token was chosen
    from (the first from the prefill).
    """

    tokens: list[list[int]]
    prefill_seconds: float
    step_seconds: list[float]
    logits: list[np.ndarray] | None = None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:  # an optional dependency
        raise ImportError("ONNX Runtime generation needs the onnx extra: "
                          "pip install 'promptbake[onnx]'") from err
    return onnxruntime


def _providers(requested: Sequence[str] | None) -> list[str]:
    ort = _onnxruntime()

    available = ort.get_available_providers()
    if requested is not None:
        missing = [p for p in requested if p not in available]
        if missing:
            raise OnnxLoadError(f"onnxruntime provider(s) {missing} are not available here "
                                f"(available: {available}); install onnxruntime-gpu for CUDA")
        return list(requested)
    # CUDA when onnxruntime-gpu is installed and a GPU answers; the CPU provider always.
    if "CUDAExecutionProvider" in available:
        try:
            import torch

            if torch.cuda.is_available():
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        except ImportError:
            pass
    return ["CPUExecutionProvider"]


def _read_manifest(path: Path) -> dict:
    """The export's manifest (stop tokens, window), or {} for a bare .onnx file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise OnnxLoadError(f"{path} is not valid JSON ({err}): export the model again") from err


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise OnnxLoadError(f"no ONNX model at {path}: pass an export directory (promptbake "
                            f"export DIR --format onnx) or its model.onnx")
    return path


class OnnxLM:
    """A causal LM exported by ``promptbake.export``, run by onnxruntime.

    ``path``: the export directory or its ``model.onnx``. ``providers``: onnxruntime execution
    providers (default: CUDA when onnxruntime-gpu and a GPU are present, else CPU).
    ``threads``: intra-op threads (default: onnxruntime's, one per physical core).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        ort = _onnxruntime()

        self.path = _resolve(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        # onnxruntime logs its warnings to stderr (e.g. about unused initializers); keep the
        # errors only.
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=_providers(providers))
        except OnnxLoadError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types
            raise OnnxLoadError(f"onnxruntime cannot load {self.path} (truncated, corrupt or not "
                                f"an ONNX model?): {err}; export it again") from err
        names = [i.name for i in self.session.get_inputs()]
        overridable = [i.name for i in self.session.get_overridable_initializers()]
        missing = [n for n in INPUTS if n not in names + overridable]
        if missing:
            raise OnnxLoadError(f"{self.path} lacks the inputs {missing}: it is not a graph "
                                f"exported by promptbake (export it with promptbake export)")
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        first = self.session.get_inputs()[names.index(self.past_names[0])]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.manifest = _read_manifest(self.path.parent / "manifest.json")
        self.providers = self.session.get_providers()

    # -- one forward pass ---------------------------------------------------------------------

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
                for _ in self.past_names]

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray], keep: int) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 "logits_to_keep": np.array(keep, dtype=np.int64)}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] fp32 at every position of one sequence (one prefill)."""
        if len(ids) == 0:
            raise ValueError("logits() needs at least one token id")
        feed = prefill_feed(ids, dict.fromkeys(self.past_names, (self.kv_heads, self.head_dim)))
        feed["logits_to_keep"] = np.array(len(ids), dtype=np.int64)
        return self.session.run(self.output_names[:1], feed)[0][0]

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, pad_id: int = 0,
                 return_logits: bool = False) -> Generation:
        """Continues each prompt (token ids; several are left-padded into one batch).

        Greedy when ``temperature`` is 0, else sampled at ``temperature`` from the smallest set
        of tokens holding ``top_p`` of the probability, with a numpy generator seeded by
        ``seed``. A sequence stops at any of ``eos_token_ids`` (default: the export's, from its
        manifest; ``()`` never stops); the batch stops when all have.
        """
        prompts = [list(p) for p in prompts_ids]
        if not prompts or not all(prompts):
            raise ValueError("generate() needs one or more non-empty prompts (lists of token ids)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        if eos_token_ids is None:
            eos_token_ids = self.manifest.get("eos_token_ids", [])
        window = self.manifest.get("architecture", {}).get("max_positions")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if window and longest > window:
            raise ValueError(f"a prompt of {longest - max_new_tokens} tokens plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's window of {window} positions: "
                             f"shorten the prompt or lower max_new_tokens")
        eos = np.asarray(list(eos_token_ids), dtype=np.int64)
        rng = np.random.default_rng(seed)
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), pad_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        positions = np.maximum(mask.cumsum(-1) - 1, 0)
        tokens: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, dtype=bool)
        kept: list[np.ndarray] = []
        steps: list[float] = []

        start = time.perf_counter()
        logits, past = self._run(ids, mask, positions, self._empty_past(batch), 1)
        prefill = None
        for step in range(max_new_tokens):
            scores = logits[:, -1]
            chosen = self._choose(scores, temperature, top_p, rng)
            if return_logits:
                kept.append(scores.copy())
            for i in np.flatnonzero(~done):
                tokens[i].append(int(chosen[i]))
            done |= np.isin(chosen, eos)
            now = time.perf_counter()
            if prefill is None:
                prefill = now - start
            else:
                steps.append(now - start)
            if done.all() or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, past = self._run(chosen[:, None].astype(np.int64), mask, positions, past, 1)
        return Generation(tokens, prefill, steps, kept if return_logits else None)

    @staticmethod
    def _choose(scores: np.ndarray, temperature: float, top_p: float,
                rng: np.random.Generator) -> np.ndarray:
        if temperature == 0:
            return scores.argmax(-1)
        z = scores.astype(np.float64) / temperature
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.empty(len(probs), dtype=np.int64)
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            if top_p < 1:
                # Nucleus: the smallest prefix of the sorted tokens whose mass reaches top_p.
                cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
                order = order[:cut]
            kept = p[order] / p[order].sum()
            chosen[i] = order[rng.choice(len(order), p=kept)]
        return chosen
