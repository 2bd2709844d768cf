"""The steps of a bake, each public: what ``bake()`` calls in order, and what other loops reuse.

* ``attach_lora``: the student, a LoRA adapter on the base model (the teacher is the same model
  with the adapter off, so one copy of the weights serves both);
* ``sample_trajectories``: y ~ P(. | u, x) from the prompted model, the teacher's distributions
  recorded as they are drawn;
* ``make_optimizer``: AdamW on the LoRA parameters and the learning-rate schedule;
* ``batch_plan``: which trajectories each optimizer step trains on, a pure function of the seed
  and the step (a resumed run sees the batches an uninterrupted one would);
* ``Divergence``: Eq. 3's loss, an ``Objective``; ``optimizer_step``: one step of any objective;
* ``for_training``, ``Clock``, ``TrainingLog``, ``progress_bar``: the run's surroundings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from promptbake import modeling
from promptbake.config import BakeConfig
from promptbake.decoding import stop_token_ids
from promptbake.distributed import SINGLE, World, all_sum, sum_gradients
from promptbake.ops import Hidden, TopK, divergence, linear_divergence
from promptbake.ops.topk_divergence import topk_divergence
from promptbake.trajectories import Trajectories, sample

# Architectures whose attention projections are q_proj/k_proj/v_proj/o_proj.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "phi3", "olmo",
              "olmo2", "granite", "mixtral")


def attach_lora(lm, config: BakeConfig):
    """``lm`` wrapped in a PEFT LoRA adapter of ``config.rank`` / ``config.alpha`` on
    ``config.target_modules`` (by architecture when None: q/k/v/o on Llama-like models, as the
    paper's authors did). The adapter starts at zero (B = 0): the student starts as the base."""
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules
    if targets is None and lm.config.model_type in LLAMA_LIKE:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # as the original authors did
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, lora)
    except ValueError as err:
        raise ValueError(f"cannot place LoRA adapters on this {lm.config.model_type} model "
                         f"({err}); name the layers with --target-modules") from err


RANK_SEED = 1_000_003  # rank r samples with seed + r * RANK_SEED (rank 0: a one-process bake's)


def sample_trajectories(model, tokenizer, prefixes: list[list[int]], config: BakeConfig,
                        cache: str, *, seed: int, samples: int, progress: bool = False,
                        what: str = "sampling", world: World = SINGLE,
                        dtype: torch.dtype | None = None) -> Trajectories:
    """``samples`` responses per prefix from ``model`` as it stands (the caller chooses the
    teacher: adapter off, the prompt in ``prefixes``), with ``config``'s sampling settings and the
    teacher's distributions recorded as ``cache`` (full, topk or none): Eq. 3's y ~ P(. | u, x).
    ``progress`` shows a bar labelled ``what``. In a distributed bake a rank samples the prefixes
    it owns (``World.owns``), with its own seed; context indices stay those of ``prefixes``.
    ``dtype``: the autocast dtype of the model's matmuls while sampling (None: its own)."""
    owned = [c for c in range(len(prefixes)) if world.owns(c)]
    sampling = dataclasses.replace(config.sampling(), samples_per_context=samples)
    bar = progress_bar(progress, len(owned) * samples, what, unit="seq")
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        traj = sample(model, [prefixes[c] for c in owned], sampling,
                      stop_token_ids(tokenizer, model),
                      torch.Generator().manual_seed(seed + RANK_SEED * world.rank), cache=cache,
                      topk=config.topk, pad_id=tokenizer.pad_token_id,
                      progress=bar.update if bar is not None else None, world=world)
    if bar is not None:
        bar.close()
    if world.distributed:
        traj = dataclasses.replace(traj, context_index=[owned[i] for i in traj.context_index])
    return traj


def make_optimizer(model, config: BakeConfig, total: int):
    """AdamW on the LoRA parameters (the B factors at ``config.lr_b_ratio`` times the learning
    rate of the rest), and the learning-rate schedule over ``total`` steps."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.lr_b_ratio == 1.0:  # one group, as checkpoints written before the ratio hold
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": [p for n, p in named if "lora_B" not in n]},
                  {"params": [p for n, p in named if "lora_B" in n],
                   "lr": config.lr * config.lr_b_ratio}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))


def lr_factor(config: BakeConfig, total: int):
    """The learning rate's multiplier at each step: linear warm-up over ``config.warmup`` of
    ``total`` steps, then constant, linear or cosine decay (``config.schedule``)."""
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


def batch_plan(step: int, trajectories: Trajectories, config: BakeConfig,
               world: World = SINGLE, contexts: int | None = None) -> list[list[int]]:
    """The trajectories of optimizer step ``step``, one list per micro-batch.

    A micro-batch holds whole contexts, all the samples of each, so they share one forward pass of
    their prompt (``modeling.response_logits``): ``config.contexts_per_batch()`` contexts drawn
    from a fresh permutation every epoch. A pure function of (seed, step), so a resumed run sees exactly
    the batches an uninterrupted one would. In a distributed bake ``trajectories`` are this rank's
    share and ``contexts`` the number of training contexts: the plan is the one-process plan over
    contexts 0 .. contexts - 1, keeping this rank's contexts (a micro-batch may come out empty).
    """
    samples = trajectories.by_context()
    order_of = sorted(samples) if contexts is None else range(contexts)
    size = config.contexts_per_batch()
    first = step * size * config.grad_accum
    out = []
    for micro in range(config.grad_accum):
        batch = []
        for k in range(first + micro * size, first + (micro + 1) * size):
            epoch, at = divmod(k, len(order_of))
            order = torch.randperm(len(order_of), generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch))
            context = order_of[int(order[at])]
            if world.owns(context):
                batch.extend(samples[context])
        out.append(batch)
    return out


class Objective(Protocol):
    """A training loss: called with the student model and the trajectories of one micro-batch
    (indices into the trajectories, those of a context together); returns the loss summed over
    the batch's response tokens (a scalar tensor to backpropagate) and the number of those
    tokens. ``optimizer_step`` averages it over the step's sequences. An objective with more
    terms (a regulariser on other contexts, say) is another objective that adds them: the
    training step has no branch for any of them. In a sharded bake a rank with no share of a
    micro-batch runs batch ``[0]`` (its first trajectory) and drops the result."""

    def __call__(self, model, batch: list[int]) -> tuple[torch.Tensor, int]: ...


class Divergence:
    """Eq. 3: sum over the response positions of D(teacher || student), the teacher being the
    prompted model and the student the same model without u on the same response tokens.

    ``config.loss`` picks D (forward KL as the paper; reverse KL or JSD(beta)). The teacher's
    distributions come from the trajectories' cache (recorded while sampling, full or top-k)
    or, with ``config.teacher == "live"``, from a forward pass of the model with its adapter off
    on the teacher's prefix. ``prefixes[c]`` is context c's (teacher ids, student ids).
    """

    def __init__(self, trajectories: Trajectories, prefixes: list[tuple[list[int], list[int]]],
                 config: BakeConfig, pad_id: int):
        self.trajectories, self.prefixes, self.config, self.pad_id = (trajectories, prefixes,
                                                                      config, pad_id)
        self._cast_head: tuple = (None, None)  # (the weight's identity, its autocast-dtype copy)

    def __call__(self, model, batch: list[int]) -> tuple[torch.Tensor, int]:
        trajectories, config, pad_id = self.trajectories, self.config, self.pad_id
        groups: dict[int, list[int]] = {}
        for k in batch:
            groups.setdefault(trajectories.context_index[k], []).append(k)
        responses = [[trajectories.responses[k] for k in ks] for ks in groups.values()]
        rows = trajectories.rows([k for ks in groups.values() for k in ks])
        device = next(model.parameters()).device
        dtype = config.autocast_dtype(device)
        student_ids = [self.prefixes[c][1] for c in groups]
        weights = first_token_weights(responses, config.first_token_weight or 1.0)
        options = dict(kind=config.loss, beta=config.beta,
                       reduction="sum" if weights is None else "none")
        head = self._head(model, dtype)
        teacher = self._teacher(model, groups, responses, rows, dtype, head)
        logprobs = config.teacher != "live"
        if head is not None:
            # The frozen LM head is applied inside the loss, a block of rows at a time: the
            # student's N x V logits and their gradient are never held (ops.linear_divergence).
            hidden = modeling.response_hidden(model, student_ids, responses, pad_id, dtype)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = linear_divergence(hidden, head, teacher, teacher_is_logprobs=logprobs,
                                         **options)
        else:
            student = modeling.response_logits(model, student_ids, responses, pad_id, dtype)
            if isinstance(teacher, TopK):
                loss = topk_divergence(student, teacher.ids.to(device),
                                       teacher.logprobs.to(device), **options)
            else:
                loss = divergence(student, teacher.to(device), teacher_is_logprobs=logprobs,
                                  **options)
        if weights is not None:
            loss = (loss * weights.to(loss.device)).sum()
        return loss, len(rows)

    def _head(self, model, dtype):
        """The frozen LM head for ``linear_divergence`` (``modeling.fused_head``), held in the
        autocast dtype from step to step: the same values autocast would make of it in every
        step (the tied head stays fp32 in the model, since the input embedding shares it).
        Casting its 28M numbers took ~7-9% of a default bake's step (two one-off runs of 14 and
        20 steps alternating on the same batches, the losses identical)."""
        head = modeling.fused_head(model)
        if head is None or dtype is None or head.dtype == dtype \
                or type(head.data) is not torch.Tensor:  # FSDP2's shards are cast as they are
            return head
        key = (head.data_ptr(), head._version, head.shape, dtype)
        if self._cast_head[0] != key:
            self._cast_head = (key, head.detach().to(dtype))
        return self._cast_head[1]

    def _teacher(self, model, groups, responses, rows, dtype, head):
        """The teacher's targets for the batch's rows: the recorded cache (full log-probs, which
        live in host memory, or ``TopK``), or with a live teacher the model with its adapter off:
        its hidden states for a fused ``head`` (``Hidden``), else its logits."""
        trajectories = self.trajectories
        if self.config.teacher == "live":
            prefixes = [self.prefixes[c][0] for c in groups]
            with torch.no_grad(), modeling.adapter(model, enabled=False):
                if head is None:
                    return modeling.response_logits(model, prefixes, responses, self.pad_id,
                                                    dtype)
                return Hidden(modeling.response_hidden(model, prefixes, responses, self.pad_id,
                                                       dtype), head)
        if trajectories.cache == "full":
            return trajectories.full_logprobs[rows]
        return TopK(trajectories.topk_ids[rows], trajectories.topk_logprobs[rows])


def first_token_weights(responses: list[list[list[int]]], weight: float) -> torch.Tensor | None:
    """Per response row (in ``Divergence``'s order: groups, their responses, their tokens), the
    loss weight: ``weight`` on each response's first token, 1 on the rest; None when all are 1."""
    if weight == 1.0:
        return None
    out = torch.ones(sum(len(r) for group in responses for r in group))
    at = 0
    for response in (r for group in responses for r in group):
        out[at] = weight
        at += len(response)
    return out


def optimizer_step(model, objective: Objective, batches: list[list[int]], optimizer, schedule,
                   max_grad_norm: float, world: World = SINGLE) -> float:
    """One optimizer step over ``batches`` (its micro-batches, from ``batch_plan``): forward and
    backward of ``objective`` on each, the loss averaged over the step's sequences, gradient
    clipping, the update and the schedule's step. Returns the loss per response token. In a
    distributed bake the batches are this rank's share: the sequence count, the gradients and
    the loss are summed over the ranks, so every rank takes the one-process step."""
    optimizer.zero_grad(set_to_none=True)
    (sequences,) = all_sum([sum(len(b) for b in batches)], world)
    total, tokens = 0.0, 0
    for batch in batches:
        if not batch:  # none of this micro-batch's contexts is this rank's
            if not world.sharded:
                continue
            # A sharded model's passes are collectives: run a stand-in, weighted zero.
            loss, n = objective(model, [0])
            loss, n = loss * 0.0, 0
        else:
            loss, n = objective(model, batch)
        (loss / sequences).backward()
        total, tokens = total + float(loss.detach()), tokens + n
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not world.sharded:  # FSDP2 summed the sharded gradients in the backward pass
        sum_gradients(params, world)
    total, tokens = all_sum([total, tokens], world)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()
    return total / tokens


# Architectures whose decoder layers' two norms are read by linear layers only (q/k/v, gate/up).
NORMS_READ_BY_LINEARS = ("llama", "mistral", "qwen2", "qwen3")


@contextlib.contextmanager
def for_training(model, dtype: torch.dtype | None):
    """The fastest way to run the training forward and backward here, with the same results up
    to rounding.

    * On CPU, ``modeling.GROUPED`` attention where it fits the architecture (Llama, and Mistral
      and Qwen without sliding windows), else eager (its backward is ~1.4x faster than SDPA's
      flash kernel at bake lengths, a hundred-odd tokens per sequence): no copy of the keys
      and values per query head, and ``modeling.response_hidden`` runs a batch's prompts and
      responses in one pass, packed into one row without padding.
    * With bf16 matmuls, the frozen linear weights are held in bf16 for the duration, so autocast
      does not cast each of them again in every step: the same bf16 values it would make. The
      output embedding (often tied to the input one) stays fp32, and the fp32 originals come
      back afterwards. Likewise each decoder layer's two norms (``NORMS_READ_BY_LINEARS``) give
      their output in bf16 once, not cast by autocast for each of the q/k/v projections and
      LoRA factors (or gate and up) that read it, and PEFT does not cast a LoRA factor's input
      back to fp32 for autocast to cast again: the same forward pass to the bit (with LoRA
      dropout 0, the default; tested); in the backward pass the gradients of those readers are
      summed in bf16.

    ``python bench/ --only bake`` times the step against the loop without these.
    """
    from peft.helpers import disable_input_dtype_casting

    inner = modeling.inner(model)
    attention = inner.config._attn_implementation
    if inner.device.type == "cpu":
        attention = modeling.GROUPED if modeling.grouped_fits(inner.config) else "eager"
    with contextlib.ExitStack() as undo:
        if dtype is not None:
            head = inner.get_output_embeddings()
            for module in inner.modules():
                if isinstance(module, torch.nn.Linear) and module is not head \
                        and not module.weight.requires_grad \
                        and module.weight.dtype == torch.float32 \
                        and type(module.weight.data) is torch.Tensor:  # FSDP2's shards stay fp32
                    undo.callback(setattr, module.weight, "data", module.weight.data)
                    module.weight.data = module.weight.data.to(dtype)
            if inner.config.model_type in NORMS_READ_BY_LINEARS:
                for hook in _norms_in(inner, dtype):
                    undo.callback(hook.remove)
        undo.enter_context(modeling.use_attention(model, attention))
        undo.enter_context(disable_input_dtype_casting(model, active=dtype is not None))
        yield model


def _norms_in(lm, dtype: torch.dtype) -> list:
    """Forward hooks giving each decoder layer's input and post-attention norm's output in
    ``dtype`` under autocast: the dtype its readers, linear layers, cast it to."""

    def cast(module, args, out):
        return out.to(dtype) if torch.is_autocast_enabled(out.device.type) else out

    return [norm.register_forward_hook(cast) for layer in getattr(lm.base_model, "layers", ())
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)]


class Clock:
    """Wall time per phase, for the manifest: ``with clock("train"): ...``."""

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


class TrainingLog:
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
                raise ValueError("log_to='wandb' needs the wandb package: pip install "
                                 "wandb") from err
            self.run = wandb.init(project="promptbake", config=dataclasses.asdict(config))

    def log(self, step: int, kl: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/kl_per_token", kl, step)
            self.writer.add_scalar("train/lr", lr, step)
        if self.run is not None:
            self.run.log({"train/kl_per_token": kl, "train/lr": lr}, step=step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Any named values at ``step`` (the engine's per-round scores)."""
        for name, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def progress_bar(enabled: bool, total: int, what: str, *, initial: int = 0, unit: str = "step"):
    """A tqdm bar labelled ``what`` counting ``unit`` (steps while training, sequences while
    sampling), or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit=unit,
                dynamic_ncols=True)

