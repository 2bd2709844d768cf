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
from promptbake.artifact import HELD_OUT, Baked, RunDir
from promptbake.config import BakeConfig
from promptbake.framing import Framing, FramingError, prompt_messages, prompt_text
from promptbake.mc_kl import kl_on, reduction as kl_reduction
from promptbake.modeling import BAKED, BASE
from promptbake.train import (Clock, Divergence, TrainingLog, attach_lora, batch_plan, for_training,
                              make_optimizer, optimizer_step, progress_bar, sample_trajectories)

log = logging.getLogger("promptbake")


def bake(prompt: str, model: str | Path | None = None, contexts=None,
         config: BakeConfig | None = None, *, out: str | Path | None = None,
         overwrite: bool = False, resume: bool = False, progress: bool = False,
         record: dict | None = None) -> Baked:
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
    """
    config = config or BakeConfig()
    config.validate()
    prompt_messages(prompt)  # a text or a conversation: refused now if it is neither
    contexts = generated.check_spec(contexts)  # pools parsed and checked before any loading
    clock = Clock()
    run = RunDir.prepare(out, prompt, config, contexts, model, overwrite=overwrite,
                         resume=resume)

    with clock("load"):
        lm, tokenizer, model_dir = models.load(model)
        framing = Framing(tokenizer, prompt, config.framing)
    with clock("generate"):  # nothing when the contexts are not generated, or were before
        drawn, generation = generated.resolve(
            contexts, prompt, (lm, tokenizer), model_dir, config.seed,
            (config.train_contexts, config.eval_contexts), say=log.info)
    with clock("load"):
        train = contexts_mod.for_bake(drawn, "train", config.train_contexts, config.seed)
        held_out = contexts_mod.for_bake(drawn, "held_out", config.eval_contexts)
        probes = contexts_mod.probe(config.probe_contexts) if config.probe_contexts else []
        _check_contexts(framing, train + held_out + probes, lm, config)
        modeling.check_logits(lm, framing.teacher_ids(train[0]))
        torch.manual_seed(config.seed)
        peft_model = attach_lora(lm, config)
    run.create(models.fingerprint(model_dir), held_out)  # only now that every input checked out
    pad_id = tokenizer.pad_token_id
    prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in train]

    # Trajectories y ~ P_theta(. | u, x), teacher targets recorded as they are drawn (Eq. 3);
    # and held-out samples to measure the bake on.
    with clock("sample"), BASE.active(peft_model):
        trajectories = run.load_trajectories("trajectories")
        if trajectories is None:
            trajectories = sample_trajectories(
                peft_model, tokenizer, [p[0] for p in prefixes], config,
                config.teacher_cache if config.teacher == "cached" else "none", seed=config.seed,
                samples=config.samples_per_context, progress=progress,
                what="sampling trajectories")
            run.save_trajectories("trajectories", trajectories)
        held_out_traj = run.load_trajectories("eval_trajectories")
        if held_out_traj is None:
            held_out_traj = sample_trajectories(
                peft_model, tokenizer, [framing.teacher_ids(c) for c in held_out], config, "none",
                seed=config.seed + 1, samples=1, progress=progress,
                what="sampling held-out trajectories")
            run.save_trajectories("eval_trajectories", held_out_traj)
        probe_traj = run.load_trajectories("probe_trajectories") if probes else None
        if probes and probe_traj is None:
            probe_traj = sample_trajectories(
                peft_model, tokenizer, [framing.teacher_ids(c) for c in probes], config, "none",
                seed=config.seed + 2, samples=1, progress=progress,
                what="sampling off-distribution probes")
            run.save_trajectories("probe_trajectories", probe_traj)

    with clock("measure_before"):  # measured in fp32, whatever the training precision
        before = kl_on(peft_model, framing, held_out, held_out_traj, {"base": BASE},
                       pad_id=pad_id)["base"]
        probe_before = kl_on(peft_model, framing, probes, probe_traj, {"base": BASE},
                             pad_id=pad_id)["base"] if probes else None
    log.info("KL(prompted || base) on held-out contexts: %s", before)

    total = config.total_steps(trajectories)
    optimizer, schedule = make_optimizer(peft_model, config, total)
    objective = Divergence(trajectories, prefixes, config, pad_id)
    step, history = run.restore(peft_model, optimizer, schedule)
    logger = TrainingLog(config, run.path)
    if config.log_to == "tensorboard":
        run.wrote("tensorboard")
    bar = progress_bar(progress, total, "baking", initial=step)
    dtype = config.autocast_dtype(next(peft_model.parameters()).device)
    peft_model.train()
    with clock("train"), for_training(peft_model, dtype):
        while step < total:
            kl = optimizer_step(peft_model, objective, batch_plan(step, trajectories, config),
                                optimizer, schedule, config.max_grad_norm)
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
        after = kl_on(peft_model, framing, held_out, held_out_traj, {"baked": BAKED},
                      pad_id=pad_id)["baked"]
        probe_after = kl_on(peft_model, framing, probes, probe_traj, {"baked": BAKED},
                            pad_id=pad_id)["baked"] if probes else None
    reduction, reduction_se = kl_reduction(before, after)
    log.info("KL(prompted || baked): %s; reduction %.1f%%", after, 100 * reduction)

    manifest = _manifest(prompt, model_dir, framing, contexts, train, held_out, config,
                         trajectories, before, after, (reduction, reduction_se), history, clock,
                         "bf16" if dtype == torch.bfloat16 else "fp32")
    if probes:
        manifest["kl_off_distribution"] = off_distribution_record(probe_before, probe_after,
                                                                  len(probes))
    if generation is not None:
        manifest["contexts"]["generated"] = generation
    if isinstance(drawn, contexts_mod.Pools):
        manifest["contexts"]["pools"] = drawn.mix()
    manifest.update(record or {})
    baked = Baked(peft_model, tokenizer, framing, manifest, run.path, held_out)
    with clock("save"):
        run.finish(baked, config.merge)
    manifest["wall_seconds"] = clock.seconds()
    if run.path is not None:
        run.write_manifest(manifest)
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



def off_distribution_record(before, after, count: int) -> dict:
    """The manifest's ``kl_off_distribution``: MC-KL before and after on the probe set."""
    reduction, reduction_se = kl_reduction(before, after)
    return {"before": before.to_dict(), "after": after.to_dict(),
            "reduction": reduction if math.isfinite(reduction) else None,
            "reduction_se": reduction_se, "contexts": count,
            "kinds": contexts_mod.probe_kinds(),
            "measured_on": "the off-distribution probe set (contexts.probe), never trained on"}


def _manifest(prompt, model_dir, framing, contexts, train, held_out, config, trajectories,
              before, after, reduction, history, clock, precision) -> dict:
    if contexts is None or contexts in (contexts_mod.BUILTIN, contexts_mod.UNCONDITIONAL):
        source = contexts or contexts_mod.BUILTIN
    elif isinstance(contexts, list):
        source = "list"
    elif contexts_mod.is_pools(contexts) or str(contexts).startswith(generated.GENERATED):
        source = str(contexts if not isinstance(contexts, dict) else contexts_mod.Pools(contexts))
    else:
        source = str(Path(contexts).resolve())
    return {
        "format": 1,
        "promptbake": versions.promptbake_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt": {"text": prompt_text(prompt),
                   "sha256": hashlib.sha256(prompt_text(prompt).encode()).hexdigest(),
                   **({} if isinstance(prompt, str) else {"messages": prompt_messages(prompt)})},
        "base_model": {"path": str(Path(model_dir).resolve()),
                       "sha256": models.fingerprint(model_dir),
                       "name": models.DEFAULT if Path(model_dir) == models.default_dir()
                       else Path(model_dir).name},
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

