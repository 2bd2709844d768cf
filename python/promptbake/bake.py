"""Baking a prompt u into a LoRA adapter theta_u (Prompt Baking, Eq. 1 and Eq. 3).

The loop: sample trajectories y ~ P_theta(. | u, x) from the prompted model on training contexts,
recording the teacher's next-token distributions as they are drawn; measure KL(prompted || base)
on held-out contexts; train a LoRA adapter so that the model *without* u matches those
distributions at every response position; measure KL(prompted || baked) on the same held-out
samples; save the adapter, the manifest and the evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
import warnings
from pathlib import Path

import torch

from promptbake import _files, _lm, contexts as contexts_mod, eval as eval_mod, models
from promptbake.framing import Framing, FramingError
from promptbake.ops import divergence
from promptbake.ops.topk_divergence import topk_divergence
from promptbake.trajectories import SamplingConfig, Trajectories, sample, stop_token_ids

log = logging.getLogger("promptbake")

LOSSES = ("forward_kl", "reverse_kl", "jsd")
SCHEDULES = ("constant", "linear", "cosine")
TEACHERS = ("cached", "live")
PRECISIONS = ("auto", "fp32", "bf16")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "phi3",
               "olmo", "olmo2", "granite", "mixtral")


@dataclasses.dataclass
class BakeConfig:
    """Every choice a bake makes; saved in the manifest. Defaults are the measured ones
    (``python bench/ --only bake`` shows them at work on the default model)."""

    # Framing and contexts
    framing: str = "default"  # student input: default | empty | none (see promptbake.framing)
    train_contexts: int = 144  # training contexts drawn from the train split
    eval_contexts: int = 24  # held-out contexts for MC-KL
    # Trajectories
    samples_per_context: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    sample_batch: int = 64  # sequences decoded together
    teacher: str = "cached"  # cached: targets recorded while sampling; live: a teacher forward per step
    teacher_cache: str = "full"  # full: fp16 log-probs over V; topk: k log-probs and a tail bucket
    topk: int = 64
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: by architecture
    # Training
    loss: str = "forward_kl"
    beta: float = 0.5
    steps: int | None = None  # None: epochs over the trajectories
    epochs: float = 4.0
    batch_size: int = 8  # trajectories per micro-batch (rounded to whole contexts)
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.1  # fraction of steps
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto: bf16 matmuls where the hardware has them, else fp32
    # Outputs
    snapshot_every: int = 0  # steps between half-baked snapshots; 0: none
    checkpoint_every: int = 10
    merge: bool = False  # also write a merged safetensors model directory
    log_to: str | None = None  # tensorboard | wandb

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name}={value} must be a finite number "
                                 f"(--{field.name.replace('_', '-')})")
        checks = [
            (self.loss in LOSSES, f"loss={self.loss!r}: choose one of {', '.join(LOSSES)}"),
            (self.schedule in SCHEDULES, f"schedule={self.schedule!r}: choose one of "
                                         f"{', '.join(SCHEDULES)}"),
            (self.teacher in TEACHERS, f"teacher={self.teacher!r}: choose cached or live"),
            (self.teacher_cache in ("full", "topk"), f"teacher_cache={self.teacher_cache!r}: "
                                                     f"choose full or topk"),
            (self.train_contexts >= 1, f"train_contexts={self.train_contexts} must be >= 1"),
            (self.eval_contexts >= 1, f"eval_contexts={self.eval_contexts} must be >= 1"),
            (self.rank >= 1, f"rank={self.rank} must be >= 1"),
            (self.alpha > 0, f"alpha={self.alpha} must be > 0"),
            (0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)"),
            (self.steps is None or self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.epochs > 0, f"epochs={self.epochs} must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (0 <= self.warmup < 1, f"warmup={self.warmup} must be a fraction in [0, 1)"),
            (0 <= self.beta <= 1, f"beta={self.beta} must be in [0, 1]"),
            (self.topk >= 1, f"topk={self.topk} must be >= 1"),
            (self.snapshot_every >= 0 and self.checkpoint_every >= 1,
             "snapshot_every must be >= 0 and checkpoint_every >= 1"),
            (self.log_to in (None, "tensorboard", "wandb"), f"log_to={self.log_to!r}: choose "
                                                            f"tensorboard or wandb"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}: choose one of "
                                           f"{', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.sampling().validate()

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.samples_per_context, self.max_new_tokens, self.temperature,
                              self.top_p, self.sample_batch)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 for the forward and backward matmuls in training, or None for fp32. The LoRA
        parameters, the optimizer state and the loss's accumulation stay fp32 either way (the
        student's logits are bf16-rounded); held-out MC-KL is always measured in fp32."""
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else None

    def contexts_per_batch(self) -> int:
        """Micro-batches hold whole contexts (their samples share the prompt's forward pass):
        ``batch_size`` trajectories, rounded to whole contexts, at least one."""
        return max(1, round(self.batch_size / self.samples_per_context))

    def total_steps(self, trajectories: Trajectories) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.contexts_per_batch() * self.grad_accum
        return max(1, math.ceil(self.epochs * len(trajectories.by_context()) / per_step))


@dataclasses.dataclass
class Baked:
    """A baked model: the base weights with the LoRA adapter, and the record of the bake."""

    model: object  # peft.PeftModel
    tokenizer: object
    framing: Framing
    manifest: dict
    path: Path | None = None
    held_out: list | None = None  # the contexts the bake was measured on
    _strength: float = 1.0

    @property
    def prompt(self) -> str:
        return self.framing.prompt

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, alpha: float) -> None:
        """Scales the LoRA delta: 0 is the base model, 1 the full bake, between is half-baked."""
        if not math.isfinite(alpha):
            raise ValueError(f"strength={alpha} must be a finite number (1 is the full bake)")
        for layer in _lm.lora_layers(self.model):
            for name in layer.scaling:
                layer.set_scale(name, float(alpha))
        self._strength = float(alpha)

    def save(self, path: str | Path) -> None:
        """Writes the adapter and manifest to a new directory (for a bake kept in memory)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not empty: choose a new directory")
        path.mkdir(parents=True, exist_ok=True)
        run = _RunDir(path, identity="saved from memory")  # the marker lets --overwrite replace it
        run._mark(status="done", files=[])
        if self.held_out is not None:
            run.wrote(_HELD_OUT)
            _files.write_text(path / _HELD_OUT, json.dumps(self.held_out, ensure_ascii=False))
        _save_adapter(self.model, path, run.wrote)
        run.wrote("manifest.json")
        self.manifest["files"] = file_record(path)
        _files.write_text(path / "manifest.json", _files.to_json(self.manifest, indent=2))
        self.path = path

    def generate(self, question: str, *, mode: str = "baked", max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0) -> str:
        """An answer to ``question`` by the ``baked`` model (no prompt), the ``base`` model (no
        prompt) or the ``prompted`` base model; greedy unless ``temperature`` > 0."""
        if mode not in ("baked", "base", "prompted"):
            raise ValueError(f"mode={mode!r}: choose baked, base or prompted")
        context = [{"role": "user", "content": question}]
        ids = (self.framing.teacher_ids(context) if mode == "prompted"
               else self.framing.student_ids(context))
        torch.manual_seed(seed)
        with _lm.adapter(self.model, enabled=mode == "baked", strength=self._strength):
            out = self.model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def bake(prompt: str, model: str | Path | None = None, contexts=None,
         config: BakeConfig | None = None, *, out: str | Path | None = None,
         overwrite: bool = False, resume: bool = False, progress: bool = False) -> Baked:
    """Bakes ``prompt`` into a LoRA adapter on ``model`` (default: SmolLM2-135M-Instruct).

    Args:
        contexts: None or "builtin" (shipped set), "none" (unconditional), a file path, or a list
            of user messages / message lists.
        out: directory for the adapter, manifest, snapshots and checkpoints; None keeps the bake
            in memory (``Baked.save`` can write it later) and cannot resume.
        overwrite: replace a previous bake in ``out`` (only files promptbake wrote are deleted).
        resume: continue the interrupted bake in ``out``; the result equals an uninterrupted run.
        progress: show a progress bar (the CLI does).
    """
    config = config or BakeConfig()
    config.validate()
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is empty: pass the text to bake with --prompt or --prompt-file")
    clock = _Clock()
    run = _RunDir.prepare(out, prompt, config, contexts, model, overwrite=overwrite,
                          resume=resume)

    with clock("load"):
        lm, tokenizer, model_dir = models.load(model)
        framing = Framing(tokenizer, prompt, config.framing)
        train = contexts_mod.for_bake(contexts, "train", config.train_contexts, config.seed)
        held_out = contexts_mod.for_bake(contexts, "held_out", config.eval_contexts)
        _check_contexts(framing, train + held_out, lm, config)
        _lm.check_logits(lm, framing.teacher_ids(train[0]))
        torch.manual_seed(config.seed)
        peft_model = _attach_lora(lm, config)
    run.create(models.fingerprint(model_dir), held_out)  # only now that every input checked out
    pad_id = tokenizer.pad_token_id
    prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in train]

    # Trajectories y ~ P_theta(. | u, x), teacher targets recorded as they are drawn (Eq. 3);
    # and held-out samples to measure the bake on.
    with clock("sample"), _lm.adapter(peft_model, enabled=False):
        trajectories = run.load_trajectories("trajectories")
        if trajectories is None:
            trajectories = _sample(peft_model, tokenizer, [p[0] for p in prefixes], config,
                                   config.teacher_cache if config.teacher == "cached" else "none",
                                   seed=config.seed, samples=config.samples_per_context,
                                   progress=progress, what="sampling trajectories")
            run.save_trajectories("trajectories", trajectories)
        held_out_traj = run.load_trajectories("eval_trajectories")
        if held_out_traj is None:
            held_out_traj = _sample(peft_model, tokenizer,
                                    [framing.teacher_ids(c) for c in held_out], config, "none",
                                    seed=config.seed + 1, samples=1, progress=progress,
                                    what="sampling held-out trajectories")
            run.save_trajectories("eval_trajectories", held_out_traj)

    with clock("measure_before"):  # measured in fp32, whatever the training precision
        before = eval_mod.kl_on(peft_model, framing, held_out, held_out_traj,
                                {"base": (False, 1.0)}, pad_id=pad_id)["base"]
    log.info("KL(prompted || base) on held-out contexts: %s", before)

    total = config.total_steps(trajectories)
    optimizer, schedule = _optimizer(peft_model, config, total)
    step, history = run.restore(peft_model, optimizer, schedule)
    logger = _Logger(config, run.path)
    if config.log_to == "tensorboard":
        run.wrote("tensorboard")
    bar = _bar(progress, total, step, "baking")
    dtype = config.autocast_dtype(next(peft_model.parameters()).device)
    peft_model.train()
    with clock("train"), _lm.for_training(peft_model, dtype):
        while step < total:
            kl = _optimizer_step(peft_model, trajectories, prefixes, config, pad_id, optimizer,
                                 schedule, step)
            step += 1
            history.append([step, kl])
            logger.log(step, kl, schedule.get_last_lr()[0])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4f}/token")
            if config.snapshot_every and step % config.snapshot_every == 0 and step < total:
                run.snapshot(peft_model, step)
            if step % config.checkpoint_every == 0 or step == total:
                run.checkpoint(peft_model, optimizer, schedule, step, history)
    if bar is not None:
        bar.close()
    logger.close()
    peft_model.eval()

    with clock("measure_after"):
        after = eval_mod.kl_on(peft_model, framing, held_out, held_out_traj,
                               {"baked": (True, 1.0)}, pad_id=pad_id)["baked"]
    reduction, reduction_se = eval_mod.reduction(before, after)
    log.info("KL(prompted || baked): %s; reduction %.1f%%", after, 100 * reduction)

    manifest = _manifest(prompt, model_dir, framing, contexts, train, held_out, config,
                         trajectories, before, after, (reduction, reduction_se), history, clock,
                         "bf16" if dtype == torch.bfloat16 else "fp32")
    baked = Baked(peft_model, tokenizer, framing, manifest, run.path, held_out)
    with clock("save"):
        run.finish(baked, tokenizer, config.merge)
    manifest["wall_seconds"] = clock.seconds()
    if run.path is not None:
        run.write_manifest(manifest)
    return baked


# -- the pieces of the loop ------------------------------------------------------------------


def _check_contexts(framing: Framing, contexts: list, lm, config: BakeConfig) -> None:
    window = getattr(lm.config, "max_position_embeddings", None)
    for i, context in enumerate(contexts):
        framing.check(context)
        need = max(len(framing.teacher_ids(context)), len(framing.student_ids(context))) + \
            config.max_new_tokens
        if window is not None and need > window:
            raise FramingError(f"context {i} with the prompt is {need - config.max_new_tokens} "
                               f"tokens; with max_new_tokens={config.max_new_tokens} that exceeds "
                               f"the model's window of {window}: shorten the prompt or the "
                               f"context, or lower --max-new-tokens")


def _attach_lora(lm, config: BakeConfig):
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules
    if targets is None and lm.config.model_type in _LLAMA_LIKE:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # as the original authors did
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, lora)
    except ValueError as err:
        raise ValueError(f"cannot place LoRA adapters on this {lm.config.model_type} model "
                         f"({err}); name the layers with --target-modules") from err


def _sample(model, tokenizer, prefixes, config: BakeConfig, cache: str, *, seed: int,
            samples: int, progress: bool, what: str) -> Trajectories:
    sampling = dataclasses.replace(config.sampling(), samples_per_context=samples)
    bar = _bar(progress, len(prefixes) * samples, 0, what)
    traj = sample(model, prefixes, sampling, stop_token_ids(tokenizer, model),
                  torch.Generator().manual_seed(seed), cache=cache, topk=config.topk,
                  pad_id=tokenizer.pad_token_id, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return traj


def _optimizer(model, config: BakeConfig, total: int):
    """AdamW on the LoRA parameters, and the learning-rate schedule over ``total`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))


def _optimizer_step(model, trajectories: Trajectories, prefixes, config: BakeConfig, pad_id: int,
                    optimizer, schedule, step: int) -> float:
    """Optimizer step ``step``: its micro-batches forward and backward, clipping, the update.
    Returns the training KL per response token."""
    optimizer.zero_grad(set_to_none=True)
    batches = _batches(step, trajectories, config)
    sequences = sum(len(b) for b in batches)
    kl_sum, tokens = 0.0, 0
    for batch in batches:
        kl, n = _train_step(model, trajectories, batch, prefixes, config, pad_id, sequences)
        kl_sum, tokens = kl_sum + kl, tokens + n
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    schedule.step()
    return kl_sum / tokens


def _batches(step: int, trajectories: Trajectories, config: BakeConfig) -> list[list[int]]:
    """The trajectories of optimizer step ``step``, one list per micro-batch.

    A micro-batch holds whole contexts, all the samples of each, so they share one forward pass of
    their prompt (``_lm.response_logits``): ``config.contexts_per_batch()`` contexts drawn from a
    fresh permutation every epoch. A pure function of (seed, step), so a resumed run sees exactly
    the batches an uninterrupted one would.
    """
    samples = trajectories.by_context()
    contexts = sorted(samples)
    size = config.contexts_per_batch()
    first = step * size * config.grad_accum
    out = []
    for micro in range(config.grad_accum):
        batch = []
        for k in range(first + micro * size, first + (micro + 1) * size):
            epoch, at = divmod(k, len(contexts))
            order = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch))
            batch.extend(samples[contexts[int(order[at])]])
        out.append(batch)
    return out


def _train_step(model, trajectories: Trajectories, batch: list[int], prefixes, config: BakeConfig,
                pad_id: int, sequences: int) -> tuple[float, int]:
    """Forward and backward of Eq. 3 on one micro-batch: sum over response positions, mean over
    the optimizer step's sequences. ``batch`` lists trajectories with those of a context
    together; ``prefixes[c]`` is context c's (teacher, student) prompt ids. Returns (summed KL,
    response tokens)."""
    groups: dict[int, list[int]] = {}
    for k in batch:
        groups.setdefault(trajectories.context_index[k], []).append(k)
    responses = [[trajectories.responses[k] for k in ks] for ks in groups.values()]
    rows = trajectories.rows([k for ks in groups.values() for k in ks])
    dtype = config.autocast_dtype(next(model.parameters()).device)
    student = _lm.response_logits(model, [prefixes[c][1] for c in groups], responses, pad_id,
                                  dtype)
    options = dict(kind=config.loss, beta=config.beta, reduction="sum")
    if config.teacher == "live":
        with torch.no_grad(), _lm.adapter(model, enabled=False):
            teacher = _lm.response_logits(model, [prefixes[c][0] for c in groups], responses,
                                          pad_id, dtype)
        kl = divergence(student, teacher, **options)
    elif trajectories.cache == "full":  # recorded targets live in host memory
        kl = divergence(student, trajectories.full_logprobs[rows].to(student.device),
                        teacher_is_logprobs=True, **options)
    else:
        kl = topk_divergence(student, trajectories.topk_ids[rows].to(student.device),
                             trajectories.topk_logprobs[rows].to(student.device), **options)
    (kl / sequences).backward()
    return float(kl.detach()), student.shape[0]


def _lr_lambda(config: BakeConfig, total: int):
    warm = int(config.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _bar(enabled: bool, total: int, initial: int, what: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit="step" if what == "baking" else "seq",
                dynamic_ncols=True)


class _Clock:
    """Wall time per phase, for the manifest."""

    def __init__(self):
        self._seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {**{k: round(v, 2) for k, v in self._seconds.items()},
                "total": round(time.perf_counter() - self._start, 2)}


class _Logger:
    """Optional TensorBoard or Weights & Biases logging of the training KL."""

    def __init__(self, config: BakeConfig, path: Path | None):
        self.writer = self.run = None
        if config.log_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("log_to='tensorboard' needs the tensorboard package: "
                                 "pip install tensorboard") from err
            where = path / "tensorboard" if path is not None else \
                Path("runs") / time.strftime("promptbake-%Y%m%d-%H%M%S")
            self.writer = SummaryWriter(str(where))
        elif config.log_to == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ValueError("log_to='wandb' needs the wandb package: pip install wandb") from err
            self.run = wandb.init(project="promptbake", config=dataclasses.asdict(config))

    def log(self, step: int, kl: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/kl_per_token", kl, step)
            self.writer.add_scalar("train/lr", lr, step)
        if self.run is not None:
            self.run.log({"train/kl_per_token": kl, "train/lr": lr}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def _manifest(prompt, model_dir, framing, contexts, train, held_out, config, trajectories,
              before, after, reduction, history, clock, precision) -> dict:
    import peft
    import transformers

    import promptbake

    if contexts is None or contexts in (contexts_mod.BUILTIN, contexts_mod.UNCONDITIONAL):
        source = contexts or contexts_mod.BUILTIN
    else:
        source = "list" if isinstance(contexts, list) else str(Path(contexts).resolve())
    return {
        "format": 1,
        "promptbake": promptbake.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt": {"text": prompt, "sha256": hashlib.sha256(prompt.encode()).hexdigest()},
        "base_model": {"path": str(Path(model_dir).resolve()),
                       "sha256": models.fingerprint(model_dir),
                       "name": models.DEFAULT if Path(model_dir) == models.default_dir()
                       else Path(model_dir).name},
        "framing": {"student": framing.student, "chat_template": framing.templated,
                    "default_system_prompt": framing.default_system},
        "contexts": {"source": source, "train": len(train), "held_out": len(held_out),
                     "held_out_file": _HELD_OUT},
        "config": dataclasses.asdict(config),
        "training_precision": precision,
        "trajectories": {"count": len(trajectories), "tokens": trajectories.tokens(),
                         "teacher": config.teacher, "cache": trajectories.cache},
        "kl": {"before": before.to_dict(), "after": after.to_dict(),
               "reduction": reduction[0] if math.isfinite(reduction[0]) else None,
               "reduction_se": reduction[1],
               "measured_on": "held-out contexts, the same samples for base and baked"},
        "train_kl_per_token": history,
        "wall_seconds": clock.seconds(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }


# -- the output directory ---------------------------------------------------------------------


_MARKER = _files.MARKER
_CHECKPOINT = "checkpoint.safetensors"  # resume-only: removed when the bake is done
_HELD_OUT = "held_out_contexts.json"  # the contexts the bake was measured on, for `promptbake kl`


class _RunDir:
    """The output directory: checkpoints, trajectories, snapshots and the final adapter.

    Files are written under temporary names and renamed; a marker lists what promptbake wrote,
    so ``--overwrite`` never deletes anything else and ``--resume`` knows the bake it continues.
    """

    def __init__(self, path: Path | None, identity: str):
        self.path = path
        self.identity = identity
        self.resume = False

    @classmethod
    def prepare(cls, out, prompt, config, contexts, model, *, overwrite: bool,
                resume: bool) -> "_RunDir":
        """Checks that the bake may use ``out``; writes nothing (see ``create``)."""
        identity = hashlib.sha256(json.dumps(
            [prompt, dataclasses.asdict(config), _contexts_key(contexts),
             str(Path(model).expanduser().resolve()) if model is not None else models.DEFAULT],
            sort_keys=True, default=str).encode()).hexdigest()
        if out is None:
            if resume:
                raise ValueError("resume needs the output directory of the bake to continue")
            return cls(None, identity)
        path = Path(out)
        marker = _files.read_marker(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; choose a directory")
        populated = path.is_dir() and any(path.iterdir())
        if resume:
            if marker is None:
                raise ValueError(f"nothing to resume in {path}: it holds no promptbake bake")
            if marker.get("identity") != identity:
                raise ValueError(f"the bake in {path} used another prompt, configuration, model "
                                 f"or contexts; pass the same ones to resume, or --overwrite to "
                                 f"start again")
            if marker.get("status") == "done":
                raise ValueError(f"the bake in {path} already finished; --overwrite bakes again")
        elif populated:
            if not overwrite:
                raise ValueError(f"output directory {path} exists and is not empty: pass "
                                 f"--overwrite to replace a previous bake there, --resume to "
                                 f"continue one, or choose another --out")
            if marker is None:
                raise ValueError(f"{path} holds files promptbake did not write; refusing to "
                                 f"overwrite it: choose another --out")
        _files.check_writable(path)  # now, not after minutes of loading and sampling
        run = cls(path, identity)
        run.resume = resume
        return run

    def create(self, model_sha256: str, held_out: list) -> None:
        """Makes the directory (removing what a previous bake wrote there, when replacing it), or
        checks that a resumed bake has the same base model weights."""
        if self.path is None:
            return
        _files.remove_temporaries(self.path)  # left by a process killed mid-write
        if self.resume:
            if _files.read_marker(self.path).get("model_sha256") != model_sha256:
                raise ValueError(f"the base model's weights changed since the bake in {self.path} "
                                 f"started; --overwrite to start again")
            return
        marker = _files.read_marker(self.path)
        if marker is not None:
            for name in marker.get("files", []):
                _files._remove(self.path / name)
            _files._remove(self.path / _MARKER)
        self.path.mkdir(parents=True, exist_ok=True)
        self._mark(status="running", files=[_HELD_OUT], model_sha256=model_sha256)
        _files.write_text(self.path / _HELD_OUT, json.dumps(held_out, ensure_ascii=False))

    def _mark(self, **changes) -> None:
        marker = _files.read_marker(self.path) or {"kind": "bake", "identity": self.identity,
                                                   "files": []}
        files = set(marker.get("files", [])) | set(changes.pop("files", []))
        marker.update(changes, files=sorted(files))
        _files.write_text(self.path / _MARKER, json.dumps(marker, indent=1))

    def wrote(self, *names: str) -> None:
        """Records files promptbake writes (or is about to) in the directory."""
        if self.path is not None:
            self._mark(files=list(names))

    def load_trajectories(self, name: str) -> Trajectories | None:
        if self.path is None or not (self.path / f"{name}.safetensors").is_file():
            return None
        return Trajectories.load(self.path / f"{name}.safetensors")

    def save_trajectories(self, name: str, trajectories: Trajectories) -> None:
        if self.path is not None:
            self.wrote(f"{name}.safetensors")
            trajectories.save(self.path / f"{name}.safetensors")

    def checkpoint(self, model, optimizer, schedule, step: int, history: list) -> None:
        """What resuming needs, as safetensors (tensors) and JSON (the rest): no pickle."""
        if self.path is None:
            return
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        tensors = {f"adapter/{k}": v.contiguous() for k, v in
                   get_peft_model_state_dict(model).items()}
        optim = optimizer.state_dict()
        for index, state in optim["state"].items():
            tensors.update({f"optimizer/{index}/{k}": v for k, v in state.items()})
        tensors["rng"] = torch.get_rng_state()
        rest = {"param_groups": optim["param_groups"], "schedule": schedule.state_dict(),
                "optimizer_state": {str(i): sorted(st) for i, st in optim["state"].items()},
                "step": step, "history": history}
        self.wrote(_CHECKPOINT)
        _files.write_with(self.path / _CHECKPOINT, lambda tmp: save_file(
            tensors, str(tmp), metadata={"state": json.dumps(rest)}))

    def restore(self, model, optimizer, schedule) -> tuple[int, list]:
        if self.path is None:
            return 0, []
        if (self.path / "checkpoint.pt").is_file() and not (self.path / _CHECKPOINT).is_file():
            raise ValueError(f"{self.path} holds a checkpoint an earlier promptbake wrote as a "
                             f"pickle (checkpoint.pt), which promptbake no longer loads: start "
                             f"again with --overwrite")
        if not (self.path / _CHECKPOINT).is_file():
            return 0, []
        from peft import set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(self.path / _CHECKPOINT), framework="pt") as f:
            rest = json.loads(f.metadata()["state"])
        tensors = load_file(str(self.path / _CHECKPOINT))
        set_peft_model_state_dict(model, {k[len("adapter/"):]: v for k, v in tensors.items()
                                          if k.startswith("adapter/")})
        optimizer.load_state_dict({
            "state": {int(i): {k: tensors[f"optimizer/{i}/{k}"] for k in keys}
                      for i, keys in rest["optimizer_state"].items()},
            "param_groups": rest["param_groups"]})
        schedule.load_state_dict(rest["schedule"])
        torch.set_rng_state(tensors["rng"])
        log.info("resuming at step %d", rest["step"])
        return rest["step"], rest["history"]

    def snapshot(self, model, step: int) -> None:
        if self.path is None:
            return
        name = f"snapshots/step-{step:06d}"
        self.wrote("snapshots")
        _files.replace_dir(self.path / name, lambda tmp: model.save_pretrained(tmp))

    def finish(self, baked: Baked, tokenizer, merge: bool) -> None:
        if self.path is None:
            return
        _save_adapter(baked.model, self.path, self.wrote)
        if merge:
            self.wrote("merged")
            _save_merged(baked, self.path / "merged")
        self.wrote("manifest.json")

    def write_manifest(self, manifest: dict) -> None:
        manifest["files"] = file_record(self.path)
        _files.write_text(self.path / "manifest.json", _files.to_json(manifest, indent=2))
        self._mark(status="done")
        for name in (_CHECKPOINT, "trajectories.safetensors"):
            _files._remove(self.path / name)  # only needed to resume; the adapter is saved


def _contexts_key(contexts) -> str:
    """What identifies the contexts of a bake for --resume: a file by its contents."""
    if isinstance(contexts, (str, Path)) and Path(contexts).is_file():
        return "sha256:" + hashlib.sha256(Path(contexts).read_bytes()).hexdigest()
    return json.dumps(contexts, sort_keys=True, default=str)


def _save_adapter(model, path: Path, record) -> None:
    """The PEFT adapter files at the top of ``path`` (peft.PeftModel.from_pretrained loads it);
    ``record(*names)`` hears of them before they appear."""
    _files.write_into(path, model.save_pretrained, lambda names: record(*names))


def _save_merged(baked: Baked, path: Path) -> None:
    """A standalone model directory with the adapter merged in at the current strength."""
    from promptbake.export.merging import write_merged

    write_merged(baked, path, baked.strength)


class DamagedBake(ValueError):
    """A bake's directory that cannot be loaded as it is: the message names the file and what
    to do."""


MANIFEST_FORMAT = 1
# What load_baked reads from a manifest: (keys, type), checked before anything is loaded.
_MANIFEST_FIELDS = ((("prompt", "text"), str), (("base_model", "path"), str),
                    (("base_model", "name"), str), (("framing", "student"), str),
                    (("config",), dict))
_RECORDED = ("adapter_model.safetensors", "adapter_config.json", _HELD_OUT,
             "eval_trajectories.safetensors")  # files whose size and hash a manifest records


def file_record(path: Path) -> dict:
    """{name: {"bytes", "sha256"}} of the bake's files in ``path``, for the manifest."""
    out = {}
    for name in _RECORDED:
        if (Path(path) / name).is_file():
            data = (Path(path) / name).read_bytes()
            out[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def read_manifest(path: str | Path) -> dict:
    """The manifest of the finished bake in ``path``, after checking what ``load_baked`` will
    read: the manifest's schema and version, and the adapter's files (sizes and hashes where the
    manifest records them, else whether they parse). Raises ``DamagedBake`` naming the file."""
    path = Path(path)
    again = ("bake again into a new directory (promptbake bake ... --out DIR), or restore the "
             "directory from a copy")
    if not path.is_dir():
        raise DamagedBake(f"no bake at {path}: the directory does not exist" if not path.exists()
                          else f"{path} is a file: pass a bake's directory")
    file = path / "manifest.json"
    if not file.is_file():
        marker = _files.read_marker(path)
        if marker is not None and marker.get("status") == "running":
            raise DamagedBake(f"the bake in {path} did not finish (no manifest.json): continue "
                              f"it with the same command and --resume")
        raise DamagedBake(f"{path} holds no finished bake (no manifest.json)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedBake(f"{file} is damaged (not valid JSON: {err}); {again}") from err
    if not isinstance(manifest, dict):
        raise DamagedBake(f"{file} is not a bake's manifest (a JSON object is expected); {again}")
    version = manifest.get("format")
    if isinstance(version, int) and version > MANIFEST_FORMAT:
        raise DamagedBake(f"{file} has format {version}, newer than this promptbake reads "
                          f"({MANIFEST_FORMAT}): upgrade promptbake")
    if version != MANIFEST_FORMAT:
        raise DamagedBake(f"{file} is not a promptbake bake's manifest (format {version!r}, "
                          f"expected {MANIFEST_FORMAT}); {again}")
    for keys, kind in _MANIFEST_FIELDS:
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind):
            raise DamagedBake(f"{file} is not a complete bake manifest: {'.'.join(keys)} is "
                              f"missing or not a {kind.__name__}; {again}")
    _check_files(path, manifest.get("files"), again)
    return manifest


def _check_files(path: Path, recorded, again: str) -> None:
    from safetensors import safe_open

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise DamagedBake(f"{path} has no {name}, the adapter's file; {again}")
    for name, expected in (recorded or {}).items():
        file = path / name
        if not isinstance(expected, dict) or not file.is_file():
            continue  # an optional file (held-out samples) may be absent
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise DamagedBake(f"{file} is damaged: {size} bytes where the manifest records "
                              f"{expected.get('bytes')} (truncated or replaced?); {again}")
        if hashlib.sha256(file.read_bytes()).hexdigest() != expected.get("sha256"):
            raise DamagedBake(f"{file} is damaged: its sha256 differs from the manifest's; "
                              f"{again}")
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedBake(f"{path / 'adapter_config.json'} is damaged (not valid JSON); "
                          f"{again}") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise DamagedBake(f"{path / 'adapter_config.json'} is not a PEFT adapter config; {again}")
    for name in ("adapter_model.safetensors", "eval_trajectories.safetensors"):
        if not (path / name).is_file():
            continue
        try:  # the header: its length, its JSON and the tensors' offsets
            with safe_open(str(path / name), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise DamagedBake(f"{path / name} is damaged ({err}); {again}") from err
    if (path / _HELD_OUT).is_file():
        try:
            json.loads((path / _HELD_OUT).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise DamagedBake(f"{path / _HELD_OUT} is damaged (not valid JSON); {again}") from err


def load_baked(path: str | Path, strength: float = 1.0, model: str | Path | None = None) -> Baked:
    """A baked model from its directory, with the LoRA delta scaled by ``strength``.

    ``model`` overrides the base model path recorded in the manifest (for a moved directory).
    The directory is checked first (``read_manifest``): a damaged one raises ``DamagedBake``.
    """
    from peft import PeftModel

    path = Path(path)
    manifest = read_manifest(path)
    base = model or manifest["base_model"]["path"]
    if model is None and manifest["base_model"]["name"] == models.DEFAULT:
        base = None  # the default model's cache may have moved: resolve it again
    lm, tokenizer, model_dir = models.load(base)
    if manifest["base_model"].get("sha256") and models.fingerprint(model_dir) != \
            manifest["base_model"]["sha256"]:
        log.warning("promptbake: the base model in %s differs from the one baked on (content "
                    "hash mismatch); the adapter may not behave as measured", model_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(lm, path)
        # PEFT only warns when the file lacks the adapter's weights, and leaves them at init
        missing = [w for w in caught if "missing adapter keys" in str(w.message)]
        if missing:
            raise ValueError(str(missing[0].message)[:200] + "...")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or layer names do not match
        raise DamagedBake(f"the adapter in {path} does not fit the base model {model_dir} "
                          f"({str(err).splitlines()[0]}); pass the model it was baked on with "
                          f"--model") from err
    peft_model.eval()
    framing = Framing(tokenizer, manifest["prompt"]["text"], manifest["framing"]["student"])
    held_out = None
    if (path / _HELD_OUT).is_file():
        held_out = json.loads((path / _HELD_OUT).read_text(encoding="utf-8"))
    baked = Baked(peft_model, tokenizer, framing, manifest, path, held_out)
    baked.strength = strength
    return baked
