"""Every choice a bake makes, in one dataclass: ``BakeConfig``.

Saved in the manifest (``BakeConfig.from_manifest`` reads it back); the CLI's defaults and
choices come from here.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from promptbake.trajectories import SamplingConfig, Trajectories

LOSSES = ("forward_kl", "reverse_kl", "jsd")
SCHEDULES = ("constant", "linear", "cosine")
TEACHERS = ("cached", "live")
TEACHER_CACHES = ("full", "topk")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGERS = ("tensorboard", "wandb")
# Settings added after bakes were written: at these defaults they are left out of the identity a
# resumed bake must share (``resume_identity``), so a bake interrupted before they existed still
# resumes. (``engine.LATER_BAKE_SETTINGS`` does the same for an engine run's bakes.)
LATER_DEFAULTS = {"adam_beta2": 0.999}


def resume_identity(config) -> dict:
    """A BakeConfig's settings as a resumed bake must share them: every field but those added
    later and left at their defaults (``LATER_DEFAULTS``)."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


@dataclasses.dataclass
class BakeConfig:
    """Every choice a bake makes; saved in the manifest. Defaults are the measured ones
    (``python bench/ --only bake`` shows them at work on the default model)."""

    # Framing and contexts
    framing: str = "default"  # student input: default | empty | none (see promptbake.framing)
    train_contexts: int = 144  # training contexts drawn from the train split
    eval_contexts: int = 24  # held-out contexts for MC-KL
    probe_contexts: int = 24  # off-distribution probes for MC-KL (contexts.probe; 0: none)
    # Trajectories
    samples_per_context: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # Sequences decoded together: 128 sampled the README's trajectories 13-22% faster than 64 on
    # 2 cores (fp32; 256 another 6%) for ~0.4 GB more KV cache; the draws are the same in law.
    sample_batch: int = 128
    teacher: str = "cached"  # cached: targets recorded while sampling; live: a teacher forward
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
    # Weight of each response's first token in the loss, the others weighing 1: the token a
    # decision turns on (call a tool or answer). None: 1 for a prompt, TOOL_FIRST_TOKEN_WEIGHT
    # for a tool bake (``orchestrate.tools``).
    first_token_weight: float | None = None
    steps: int | None = None  # None: epochs over the trajectories
    epochs: float = 4.0
    batch_size: int = 8  # trajectories per micro-batch (rounded to whole contexts)
    grad_accum: int = 1
    lr: float = 3e-3
    # LoRA+ (Hayou et al., 2024): the B factors learn at this multiple of lr, the A factors at lr
    lr_b_ratio: float = 1.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (its first stays 0.9)
    schedule: str = "cosine"
    warmup: float = 0.1  # fraction of steps
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto: bf16 matmuls where the hardware has them, else fp32
    # The prompted teacher's matmuls while it samples the training trajectories and its targets
    # are recorded: fp32, bf16 or auto (as ``precision``). bf16 samples 1.5-1.7x faster on 2
    # cores but lost 0.1-0.7 held-out and 0.6-1.5 off-distribution points of KL reduction on
    # three prompts (``python bench/ --only prompt-sweep``, README), hence fp32. Held-out
    # samples are always drawn in fp32.
    sample_precision: str = "fp32"
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
            (self.teacher_cache in TEACHER_CACHES, f"teacher_cache={self.teacher_cache!r}: "
                                                   f"choose full or topk"),
            (self.train_contexts >= 1, f"train_contexts={self.train_contexts} must be >= 1"),
            (self.eval_contexts >= 1, f"eval_contexts={self.eval_contexts} must be >= 1"),
            (0 <= self.probe_contexts <= 48, f"probe_contexts={self.probe_contexts} must be in "
                                             f"[0, 48] (the probe set has 48)"),
            (self.rank >= 1, f"rank={self.rank} must be >= 1"),
            (self.alpha > 0, f"alpha={self.alpha} must be > 0"),
            (0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)"),
            (self.steps is None or self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.epochs > 0, f"epochs={self.epochs} must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1,
             "batch_size and grad_accum must be >= 1"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.lr_b_ratio > 0, f"lr_b_ratio={self.lr_b_ratio} must be > 0"),
            (0 < self.adam_beta2 < 1, f"adam_beta2={self.adam_beta2} must be in (0, 1)"),
            (0 <= self.warmup < 1, f"warmup={self.warmup} must be a fraction in [0, 1)"),
            (0 <= self.beta <= 1, f"beta={self.beta} must be in [0, 1]"),
            (self.first_token_weight is None or self.first_token_weight > 0,
             f"first_token_weight={self.first_token_weight} must be > 0"),
            (self.topk >= 1, f"topk={self.topk} must be >= 1"),
            (self.snapshot_every >= 0 and self.checkpoint_every >= 1,
             "snapshot_every must be >= 0 and checkpoint_every >= 1"),
            (self.log_to in (None, *LOGGERS), f"log_to={self.log_to!r}: choose tensorboard "
                                              f"or wandb"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}: choose one of "
                                           f"{', '.join(PRECISIONS)}"),
            (self.sample_precision in PRECISIONS,
             f"sample_precision={self.sample_precision!r}: choose one of {', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.sampling().validate()

    @classmethod
    def from_manifest(cls, manifest: dict) -> BakeConfig:
        """The configuration a bake's manifest records (fields it does not know are ignored, so
        a manifest from another promptbake version still gives a configuration)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (manifest.get("config") or {}).items() if k in fields})

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

    def sampling_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the prompted teacher's matmuls while it samples the training
        trajectories (``sample_precision``; auto: ``precision``'s): bf16 there makes the
        teacher's recorded targets the bf16-rounded model's, as the student's are in training."""
        precision = self.precision if self.sample_precision == "auto" else self.sample_precision
        return dataclasses.replace(self, precision=precision).autocast_dtype(device)

    def contexts_per_batch(self) -> int:
        """Micro-batches hold whole contexts (their samples share the prompt's forward pass):
        ``batch_size`` trajectories, rounded to whole contexts, at least one."""
        return max(1, round(self.batch_size / self.samples_per_context))

    def total_steps(self, trajectories: Trajectories, contexts: int | None = None) -> int:
        """``steps``, or ``epochs`` over the training contexts (``contexts``, by default those
        of ``trajectories``; a distributed rank holds a share of them)."""
        if self.steps is not None:
            return self.steps
        per_step = self.contexts_per_batch() * self.grad_accum
        count = len(trajectories.by_context()) if contexts is None else contexts
        return max(1, math.ceil(self.epochs * count / per_step))

