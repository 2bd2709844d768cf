"""Baking a prompt u into a LoRA adapter theta_u (Prompt Baking, Eq. 1 and Eq. 3).

The loop: sample trajectories y ~ P_theta(. | u, x) from the prompted model on training contexts,
recording the teacher's next-token distributions as they are drawn; measure KL(prompted || base)
on held-out contexts; train a LoRA adapter so that the model *without* u matches those
distributions at every response position; measure KL(prompted || baked) on the same held-out
samples; save the adapter, the manifest and the evidence. Each step is a public function of
``promptbake.train``; the directory is ``promptbake.artifact``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import torch

from promptbake import contexts as contexts_mod, generated, modeling, models, versions
from promptbake.artifact import HELD_OUT, Baked, RunDir, contexts_key
from promptbake.config import BakeConfig
from promptbake.distributed import World, barrier, check_same, gather, rank_zero_first, shard
from promptbake.framing import Framing, FramingError, prompt_messages, prompt_text
from promptbake.mc_kl import KL, kl_on, reduction as kl_reduction
from promptbake.modeling import BAKED, BASE
from promptbake.train import (Clock, Divergence, TrainingLog, attach_lora, batch_plan, for_training,
                              make_optimizer, optimizer_step, progress_bar, sample_trajectories)

log = logging.getLogger("promptbake")


def bake(prompt: str, model: str | Path | None = None, contexts=None,
         config: BakeConfig | None = None, *, out: str | Path | None = None,
         overwrite: bool = False, resume: bool = False, progress: bool = False,
         record: dict | None = None, fsdp: bool = False, device: str | None = None,
         teacher_model: str | Path | None = None, rehearse=()) -> Baked:
    """Bakes ``prompt`` into a LoRA adapter on ``model`` (default: SmolLM2-135M-Instruct).

    Args:
        prompt: a system text, or a conversation (a list of chat messages: a system message
            and demonstration turns) that the teacher reads before each context.
        contexts: None or "builtin" (shipped set), "none" (unconditional), a file path, a list
            of user messages / message lists, "generated:N" (N messages the model writes for
            the prompt, ``promptbake.generated``), or pools with weights ("general=2,short=1,
            generated-domain=1,my.jsonl=1", a dict or ``contexts.Pools``).
        out: directory for the adapter, manifest, snapshots and checkpoints; None keeps the bake
            in memory (``Baked.save`` can write it later) and cannot resume.
        overwrite: replace a previous bake in ``out`` (only files promptbake wrote are deleted).
        resume: continue the interrupted bake in ``out``; the result equals an uninterrupted run.
        progress: show a progress bar (the CLI does).
        record: more entries for the manifest (e.g. the tool specs the prompt was rendered
            from), kept under their own keys.
        fsdp: under torchrun, shard the decoder layers over the ranks with FSDP2
            (``distributed.shard``) for a model one device cannot hold; the result is the same
            as without (to floating-point tolerance). Not with ``config.merge``: merge after
            the bake (``promptbake export``).
        device: where to bake ("cpu", "cuda", "cuda:1"); None: this rank's GPU when there is
            one (under torchrun, the one its LOCAL_RANK names), else the CPU. With ``fsdp``
            each rank's shards go there.
        teacher_model: another model, with the same vocabulary, whose prompted distributions
            the student learns (None: ``model`` itself with ``prompt``, the paper's bake). The
            engine uses it to bake a prompt into an already baked model from the base model's
            reading of the prompt; it also distils one model's prompted behaviour into another.
            Needs a cached teacher (not ``teacher="live"``) and no ``fsdp``. The manifest's KL
            is then KL(teacher with u || student), before and after.
        rehearse: ``Rehearsal``s: more training contexts on which the teacher reads another
            prompt, so that what a model baked earlier is kept while ``prompt`` is baked into
            it (the engine's rehearsal). The KL before and after is ``prompt``'s only.

    Under ``torchrun`` (a process group initialised, ``distributed.World``) every rank runs this
    with the same arguments: each samples and keeps its share of the contexts, the steps are
    data parallel, held-out MC-KL is measured on shares and pooled, and rank 0 alone writes.
    """
    config = config or BakeConfig()
    config.validate()
    prompt_messages(prompt)  # a text or a conversation: refused now if it is neither
    rehearse = [Rehearsal.checked(r) for r in rehearse]
    contexts = generated.check_spec(contexts)  # pools parsed and checked before any loading
    clock = Clock()
    world = World.current()
    if device is not None and torch.device(device).type == "cuda" and \
            not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU (a CPU build of torch, or "
                         f"no driver): drop --device to bake on the CPU, or install torch's "
                         f"CUDA build")
    if teacher_model is not None and (config.teacher == "live" or fsdp):
        raise ValueError("--teacher-model records the teacher's distributions while sampling: "
                         "use --teacher cached (not live), without --fsdp")
    if fsdp and config.merge:
        raise ValueError("--merge needs the whole model on one rank and --fsdp shards it: bake "
                         "with --fsdp alone, then merge with promptbake export DIR --format safetensors --out MERGED")
    run = RunDir.prepare(out, prompt, config, contexts, model, overwrite=overwrite,
                         resume=resume, world=world, teacher_model=teacher_model,
                         rehearse=[(r.prompt, contexts_key(r.contexts), r.count)
                                   for r in rehearse])
    check_same((run.identity, fsdp), world, "the prompt, settings, contexts, model, teacher "
               "model, rehearsal or --fsdp")

    place = torch.device(device) if device is not None else world.device
    with clock("load"):
        lm, tokenizer, model_dir = models.load(model)
        if not fsdp:  # sharded, each rank's shards go to the device (distributed.shard)
            lm.to(place)
        framing = Framing(tokenizer, prompt, config.framing)
        teacher = _Teacher.load(teacher_model, lm, framing, place)
    with clock("generate"), rank_zero_first(world):  # rank 0 fills the cache, the rest read it
        drawn, generation = generated.resolve(
            contexts, prompt, (lm, tokenizer), model_dir, config.seed,
            (config.train_contexts, config.eval_contexts), say=log.info)
    with clock("load"):
        train = contexts_mod.for_bake(drawn, "train", config.train_contexts, config.seed)
        held_out = contexts_mod.for_bake(drawn, "held_out", config.eval_contexts)
        probes = contexts_mod.probe(config.probe_contexts) if config.probe_contexts else []
        for what, found, asked, flag in (("training", train, config.train_contexts,
                                          "--train-contexts"),
                                         ("held-out", held_out, config.eval_contexts,
                                          "--eval-contexts"),
                                         ("probe", probes, config.probe_contexts,
                                          "--probe-contexts")):
            if len(found) < asked and world.writes:
                log.warning("%s asks for %d %s contexts; there are %d, so the bake uses %d "
                            "(the manifest's contexts record what was used)", flag, asked, what,
                            len(found), len(found))
        _check_contexts(framing, train + held_out + probes, lm, config)
        if teacher.lm is not None:
            _check_contexts(teacher.framing, train + held_out + probes, teacher.lm, config)
        modeling.check_logits(teacher.lm or lm, teacher.framing.teacher_ids(train[0]))
        rehearsed = [(Framing(teacher.framing.tokenizer, r.prompt, config.framing),
                      contexts_mod.for_bake(r.contexts, "train", r.count, config.seed))
                     for r in rehearse]
        for their, found in rehearsed:
            _check_contexts(their, found, teacher.lm or lm, config)
        _check_world(world, train, held_out, probes)
        torch.manual_seed(config.seed)
        peft_model = attach_lora(lm, config)
        if fsdp:
            world = shard(peft_model, world, place)
    run.create(models.fingerprint(model_dir), held_out)  # only now that every input checked out
    barrier(world)  # the directory exists before any rank writes its share
    pad_id = tokenizer.pad_token_id
    if teacher.lm is None:
        teacher = dataclasses.replace(teacher, lm=peft_model)  # the same weights, adapter off
    prefixes = [(teacher.framing.teacher_ids(c), framing.student_ids(c)) for c in train] + \
        [(their.teacher_ids(c), framing.student_ids(c)) for their, found in rehearsed for c in found]
    progress = progress and world.writes

    # Trajectories y ~ P_theta(. | u, x), teacher targets recorded as they are drawn (Eq. 3);
    # and held-out samples to measure the bake on. A rank draws only its share of the contexts.
    def sampled(name, prompts, cache, seed, samples, what, dtype=None):
        found = run.load_trajectories(name)
        if found is None:
            found = sample_trajectories(teacher.lm, tokenizer, prompts, config, cache,
                                        seed=seed, samples=samples, progress=progress,
                                        what=what, world=world, dtype=dtype)
            run.save_trajectories(name, found)
        return found

    with clock("sample"), BASE.active(peft_model):
        trajectories = sampled(
            "trajectories", [p[0] for p in prefixes],
            config.teacher_cache if config.teacher == "cached" else "none", config.seed,
            config.samples_per_context, "sampling trajectories",
            config.sampling_dtype(next(teacher.lm.parameters()).device))
        held_out_traj = sampled("eval_trajectories",
                                [teacher.framing.teacher_ids(c) for c in held_out],
                                "none", config.seed + 1, 1, "sampling held-out trajectories")
        probe_traj = sampled("probe_trajectories",
                             [teacher.framing.teacher_ids(c) for c in probes],
                             "none", config.seed + 2, 1,
                             "sampling off-distribution probes") if probes else None

    if world.distributed:  # the finished directory holds every rank's samples, as one file
        run.save_whole("eval_trajectories", gather(held_out_traj, world))
        if probes:
            run.save_whole("probe_trajectories", gather(probe_traj, world))

    teacher_states: dict = {}  # the teacher's pass, run before training, serves after it too

    def measured(variant, contexts, samples):  # measured in fp32, pooled over the ranks
        return KL.merged(gather(kl_on(peft_model, framing, contexts, samples,
                                      {"kl": variant}, pad_id=pad_id, world=world,
                                      teacher=teacher.pair(),
                                      teacher_states=teacher_states)["kl"], world))

    with clock("measure_before"):
        before = measured(BASE, held_out, held_out_traj)
        probe_before = measured(BASE, probes, probe_traj) if probes else None
    log.info("KL(prompted || base) on held-out contexts: %s", before)

    total = config.total_steps(trajectories, len(prefixes))
    optimizer, schedule = make_optimizer(peft_model, config, total)
    objective = Divergence(trajectories, prefixes, config, pad_id)
    step, history = run.restore(peft_model, optimizer, schedule)
    logger = TrainingLog(config if world.writes else dataclasses.replace(config, log_to=None),
                         run.path)
    if config.log_to == "tensorboard" and world.writes:
        run.wrote("tensorboard")
    bar = progress_bar(progress, total, "baking", initial=step)
    dtype = config.autocast_dtype(next(peft_model.parameters()).device)
    peft_model.train()
    with clock("train"), for_training(peft_model, dtype):
        while step < total:
            kl = optimizer_step(peft_model, objective,
                                batch_plan(step, trajectories, config, world, len(prefixes)),
                                optimizer, schedule, config.max_grad_norm, world)
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
        after = measured(BAKED, held_out, held_out_traj)
        probe_after = measured(BAKED, probes, probe_traj) if probes else None
    reduction, reduction_se = kl_reduction(before, after)
    log.info("KL(prompted || baked): %s; reduction %.1f%%", after, 100 * reduction)

    manifest = _manifest(prompt, model_dir, framing, contexts, train, held_out, config,
                         trajectories, before, after, (reduction, reduction_se), history, clock,
                         "bf16" if dtype == torch.bfloat16 else "fp32")
    if probes:
        manifest["kl_off_distribution"] = off_distribution_record(probe_before, probe_after,
                                                                  len(probes))
    if rehearse:
        manifest["rehearsal"] = [{"prompt": prompt_text(r.prompt), "contexts": len(found),
                                  "source": _source(r.contexts)}
                                 for r, (_, found) in zip(rehearse, rehearsed)]
    if teacher_model is not None:
        manifest["teacher_model"] = _model_record(teacher.path)
        manifest["kl"]["measured_on"] += (f"; the teacher is {manifest['teacher_model']['name']} "
                                          f"with the prompt, not the base model")
    if generation is not None:
        manifest["contexts"]["generated"] = generation
    if isinstance(drawn, contexts_mod.Pools):
        manifest["contexts"]["pools"] = drawn.mix()
    manifest.update(record or {})
    baked = Baked(peft_model, tokenizer, framing, manifest, run.path, held_out)
    with clock("save"):
        run.finish(baked, config.merge)
    if world.distributed:
        manifest["distributed"] = {"world_size": world.size, "fsdp": world.sharded}
    manifest["wall_seconds"] = clock.seconds()
    if run.path is not None:
        run.write_manifest(manifest)
    barrier(world)  # no rank returns before rank 0 has written the bake
    return baked


# -- what the loop checks and records ----------------------------------------------------------


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



@dataclasses.dataclass(frozen=True)
class Rehearsal:
    """Training contexts a bake adds on which the teacher reads another ``prompt``: ``count``
    drawn from ``contexts`` (a list of messages, a contexts file, None or "builtin": the shipped
    set) as a bake of them would draw them. Baking u2 into a model that has u1 baked in, with
    u1's contexts rehearsed, trains the student on both: u2's teacher on u2's contexts, u1's on
    u1's, instead of u2's everywhere."""

    prompt: str | list
    contexts: object
    count: int

    @classmethod
    def checked(cls, rehearsal) -> "Rehearsal":
        rehearsal = rehearsal if isinstance(rehearsal, cls) else cls(*rehearsal)
        prompt_messages(rehearsal.prompt)
        if not isinstance(rehearsal.count, int) or rehearsal.count < 1:
            raise ValueError(f"a rehearsal needs count >= 1 contexts, not {rehearsal.count!r}")
        spec = rehearsal.contexts
        if spec == contexts_mod.UNCONDITIONAL or contexts_mod.is_pools(spec) or \
                (isinstance(spec, str) and spec.startswith(generated.GENERATED)):
            raise ValueError(f"rehearsal contexts {spec!r}: give a list of messages, a contexts "
                             f"file or 'builtin' (generated contexts and pools are not rehearsed)")
        return rehearsal


def _model_record(model_dir) -> dict:
    return {"path": str(Path(model_dir).resolve()), "sha256": models.fingerprint(model_dir),
            "name": models.DEFAULT if Path(model_dir) == models.default_dir()
            else Path(model_dir).name}


@dataclasses.dataclass(frozen=True)
class _Teacher:
    """Who reads the prompt: ``lm`` with ``framing`` (lm None until the student exists: the
    student's own weights with the adapter off), loaded from ``path`` for a separate teacher."""

    lm: object | None
    framing: Framing
    path: Path | None = None

    @classmethod
    def load(cls, teacher_model, student, framing: Framing, place) -> "_Teacher":
        if teacher_model is None:
            return cls(None, framing)
        lm, their_tokenizer, path = models.load(teacher_model)
        if their_tokenizer.get_vocab() != framing.tokenizer.get_vocab() or \
                lm.get_output_embeddings().weight.shape[0] != \
                student.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"--teacher-model {teacher_model} has another vocabulary than the "
                             f"model baked into: the student learns the teacher's next-token "
                             f"distributions, so both need the same tokenizer and LM head size")
        if getattr(their_tokenizer, "chat_template", None) != \
                getattr(framing.tokenizer, "chat_template", None):
            raise ValueError(f"--teacher-model {teacher_model} has another chat template than "
                             f"the model baked into: a response must follow the same assistant "
                             f"header on both sides; give both models one template (copy the "
                             f"student's tokenizer files into the teacher's directory)")
        lm.to(place).eval().requires_grad_(False)
        return cls(lm, Framing(their_tokenizer, framing.prompt, framing.student), path)

    def pair(self):
        """``kl_on``'s teacher: None for the student's own weights, else (model, framing)."""
        return None if self.path is None else (self.lm, self.framing)


def _check_world(world: World, train: list, held_out: list, probes: list) -> None:
    if not world.distributed:
        return
    fewest = min(len(train), len(held_out), *([len(probes)] if probes else []))
    if world.size > fewest:
        raise ValueError(f"{world.size} ranks but only {fewest} contexts in the smallest set "
                         f"(train {len(train)}, held-out {len(held_out)}, probes {len(probes)}): "
                         f"every rank needs a share; use at most {fewest} ranks or more contexts")


def off_distribution_record(before, after, count: int) -> dict:
    """The manifest's ``kl_off_distribution``: MC-KL before and after on the probe set."""
    reduction, reduction_se = kl_reduction(before, after)
    return {"before": before.to_dict(), "after": after.to_dict(),
            "reduction": reduction if math.isfinite(reduction) else None,
            "reduction_se": reduction_se, "contexts": count,
            "kinds": contexts_mod.probe_kinds(),
            "measured_on": "the off-distribution probe set (contexts.probe), never trained on"}


def _source(contexts) -> str:
    """How the manifest names a contexts spec: builtin, none, list, pools, generated or a path."""
    if contexts is None or contexts in (contexts_mod.BUILTIN, contexts_mod.UNCONDITIONAL):
        return contexts or contexts_mod.BUILTIN
    if isinstance(contexts, list):
        return "list"
    if contexts_mod.is_pools(contexts) or str(contexts).startswith(generated.GENERATED):
        return str(contexts if not isinstance(contexts, dict) else contexts_mod.Pools(contexts))
    return str(Path(contexts).resolve())


def _manifest(prompt, model_dir, framing, contexts, train, held_out, config, trajectories,
              before, after, reduction, history, clock, precision) -> dict:
    source = _source(contexts)
    return {
        "format": 1,
        "promptbake": versions.promptbake_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt": {"text": prompt_text(prompt),
                   "sha256": hashlib.sha256(prompt_text(prompt).encode()).hexdigest(),
                   **({} if isinstance(prompt, str) else {"messages": prompt_messages(prompt)})},
        "base_model": _model_record(model_dir),
        "framing": {"student": framing.student, "chat_template": framing.templated,
                    "default_system_prompt": framing.default_system},
        "contexts": {"source": source, "train": len(train), "held_out": len(held_out),
                     "held_out_file": HELD_OUT},
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
        "versions": versions.libraries("torch", "transformers", "peft"),
    }

