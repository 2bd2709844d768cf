"""Bake suite: the README's persona baked into the default model, and a reference loop beside it.

1. The bake as a user runs it (``promptbake.bake`` with its defaults, in a process of its own
   with the C allocator's defaults): wall time per phase, MC-KL before and after on held-out
   contexts, its process's peak resident memory, a few answers without the prompt before and
   after.
2. Side by side on the same trajectories, LoRA initialisation, batches and hyperparameters:
   promptbake's training loop (teacher distributions cached while sampling, the fused divergence,
   each context's prompt run once for its samples, the LM head on response positions only, on
   CPU the sequences packed without padding and attention with no copy per query head
   (``train.for_training``), bf16 matmuls where the CPU has them, the LM head fused with the
   loss; the same with the head unfused (``PROMPTBAKE_FUSED_HEAD=0``: the student's N x V
   logits held, as before ``ops.linear_divergence``); and the same in fp32) and a reference
   loop in the style of the original authors' code (a live teacher forward every step, full
   logits, eager ``log_softmax`` + ``kl_div``, fp32). Held-out KL is measured every few steps
   (outside the training clocks); the ratio is of the training wall time each needs to reach
   the same held-out KL. The loops take turns, a dozen steps each, so that a slow spell of a shared
   machine falls on all of them alike, in a process of their own with the C allocator's
   defaults, as a user's bake runs. Each loop's peak resident memory while training, above what
   was resident before it, is measured in another process, untimed, over the steps with the
   most response tokens: it needs glibc to return freed memory at once, which slows what it
   runs, the reference loop most (timed under it, the ratio read 5.00x; timed so, 3.75x and
   4.33x in two runs).
3. The baked adapter measured again on every held-out context (58, fresh samples, another
   seed): the bake's own figure uses its first 24, and close calls need the smaller
   error.

Targets: whole bake <= 5 minutes; held-out KL reduction >= 90%; >= 5x faster than the
reference loop to the same KL.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
import promptbake
from promptbake import BakeConfig, contexts as contexts_mod, mc_kl, models
from promptbake.modeling import FUSED_HEAD_ENV
from promptbake.framing import Framing, align
from promptbake.modeling import BAKED, BASE
from promptbake.persona import pirate
from promptbake.train import (Divergence, attach_lora, batch_plan, for_training, make_optimizer,
                              optimizer_step, sample_trajectories)
from promptbake.trajectories import Trajectories

PROMPT = pirate().prompt
QUESTIONS = ["What is the capital of France?", "How do I boil an egg?",
             "Can you recommend a good book?"]
TARGET_MINUTES = 5.0
TARGET_REDUCTION = 0.90
TARGET_SPEEDUP = 5.0
LOOPS = ("promptbake", "promptbake-unfused", "promptbake-fp32", "reference")


def run(args, log) -> dict:
    config = BakeConfig()
    if args.quick:
        config = dataclasses.replace(config, train_contexts=16, eval_contexts=8, epochs=1.0)
    result = {"suite": "bake", "machine": harness.machine(), "prompt": PROMPT,
              "config": dataclasses.asdict(config)}

    log("  the bake, as `promptbake bake` runs it")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak = whole_bake(config, f"{tmp}/baked")
        baked = promptbake.load_baked(f"{tmp}/baked")
        result["whole_bake_seconds"] = baked.manifest["wall_seconds"]["total"]
        result["whole_bake_process_seconds"] = seconds
        result["whole_bake_peak_rss_bytes"] = peak
        result["manifest"] = baked.manifest
        result["answers"] = [{"question": q, **{v: baked.generate(q, variant=v, max_new_tokens=48)
                                               for v in ("base", "prompted", "baked")}}
                             for q in QUESTIONS]
        # The bake measures itself on its first eval_contexts held-out contexts; measure it
        # again on every held-out context, with fresh samples, for a second, larger estimate.
        log("  the baked adapter on every held-out context")
        found = mc_kl.mc_kl(baked, contexts_mod.BUILTIN, seed=config.seed + 2)
        reduction, se = mc_kl.reduction(found["base"], found["1"])
        result["all_held_out"] = {"before": found["base"].to_dict(), "after": found["1"].to_dict(),
                                  "reduction": reduction, "reduction_se": se}
        del baked

    log("  side by side: promptbake's loop vs the reference loop (a process of their own)")
    result["loops"] = side_by_side_process(config)
    result["checks"] = checks(result)
    return result


def whole_bake(config: BakeConfig, out: str) -> tuple[float, int | None]:
    """Bakes PROMPT into ``out`` in a process of its own, as a user's ``promptbake bake`` runs:
    with the C allocator's defaults (this process switches them to measure memory, which made
    sampling 29% slower) and nothing else resident. Returns the child's wall seconds (start-up
    included; the manifest's clock has the bake call's) and its peak resident set in bytes, from
    the kernel's accounting of that child (None off Linux)."""
    script = ("import json, sys, promptbake; promptbake.bake(sys.argv[1], config=promptbake."
              "BakeConfig(**json.loads(sys.argv[2])), out=sys.argv[3])")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", script, PROMPT,
                              json.dumps(dataclasses.asdict(config)), out])
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(child.pid, 0)
        exit_code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024  # KiB
    else:
        exit_code, peak = child.wait(), None
    if exit_code != 0:
        raise RuntimeError(f"the bake's process exited with status {exit_code}")
    return time.perf_counter() - start, peak


def side_by_side_process(config: BakeConfig) -> dict:
    """``side_by_side`` in a process of its own with the C allocator's defaults
    (``harness.in_child``), then ``loop_memory`` in another, on the same trajectories."""
    with tempfile.TemporaryDirectory() as tmp:
        args = {"config": dataclasses.asdict(config),
                "trajectories": os.path.join(tmp, "trajectories.safetensors")}
        config_of = "bake.BakeConfig(**args['config'])"
        result = harness.in_child(
            "bake", f"bake.side_by_side({config_of}, log, args['trajectories'])", args)
        memory = harness.in_child(
            "bake", f"bake.loop_memory({config_of}, log, args['trajectories'])", args)
        for name, found in memory.items():
            result["loops"][name].update(found)
        return result


class Loops:
    """What every loop trains on: the default model, the README persona's training contexts
    and their trajectories (sampled, or those another process saved), and the training steps
    of each loop."""

    def __init__(self, config: BakeConfig, trajectories: Trajectories | None = None):
        self.config, self.fp32 = config, dataclasses.replace(config, precision="fp32")
        self.lm, self.tokenizer, _ = models.load(None)
        self.framing = Framing(self.tokenizer, PROMPT, config.framing)
        train = contexts_mod.for_bake(None, "train", config.train_contexts, config.seed)
        self.prefixes = [(self.framing.teacher_ids(c), self.framing.student_ids(c))
                         for c in train]
        self.pad = self.tokenizer.pad_token_id
        self.trajectories = trajectories or sample_trajectories(
            self.lm, self.tokenizer, [p[0] for p in self.prefixes], config, "full",
            seed=config.seed, samples=config.samples_per_context)
        self.total = config.total_steps(self.trajectories)
        self.every = max(1, self.total // 12)  # held-out checks: the time-to-KL resolution

    def fresh(self, name: str):
        """A new adapter on a copy of the model, its optimizer and schedule, and a training
        function ``train(segment, step_seconds)`` for the loop ``name``."""
        torch.manual_seed(self.config.seed)
        model = attach_lora(copy.deepcopy(self.lm), self.config)
        optimizer, schedule = make_optimizer(model, self.config, self.total)
        setting = self.fp32 if name == "promptbake-fp32" else self.config
        objective = Divergence(self.trajectories, self.prefixes, setting, self.pad)
        dtype = setting.autocast_dtype(torch.device("cpu"))

        def train(segment, step_seconds: list[float]) -> None:
            with contextlib.nullcontext() if name == "reference" else \
                    for_training(model, dtype), unfused(name == "promptbake-unfused"):
                for step in segment:
                    begin = time.perf_counter()
                    if name == "reference":
                        self.reference_step(model, optimizer, schedule, step)
                    else:
                        optimizer_step(model, objective,
                                       batch_plan(step, self.trajectories, setting),
                                       optimizer, schedule, setting.max_grad_norm)
                    step_seconds.append(time.perf_counter() - begin)

        return model, train

    def reference_step(self, model, optimizer, schedule, step):
        # The original code's shape: whole sequences through the model, a live teacher forward
        # with the adapter off, full-vocabulary log_softmax + kl_div, fp32, default attention.
        trajectories, prefixes, pad = self.trajectories, self.prefixes, self.pad
        optimizer.zero_grad(set_to_none=True)
        batches = batch_plan(step, trajectories, self.config)
        sequences = sum(len(b) for b in batches)
        for batch in batches:
            teacher_seqs, student_seqs, spans = [], [], []
            for k in batch:
                t_prefix, s_prefix = prefixes[trajectories.context_index[k]]
                t, s, t0, s0 = align(t_prefix, s_prefix, trajectories.responses[k])
                teacher_seqs.append(t)
                student_seqs.append(s)
                spans.append((t0, s0, len(trajectories.responses[k])))
            with torch.no_grad(), BASE.active(model):
                teacher = model(**_padded(teacher_seqs, pad)).logits
            student = model(**_padded(student_seqs, pad)).logits
            t_rows = torch.cat([teacher[i, t0 - 1:t0 - 1 + n] for i, (t0, _, n) in enumerate(spans)])
            s_rows = torch.cat([student[i, s0 - 1:s0 - 1 + n] for i, (_, s0, n) in enumerate(spans)])
            kl = F.kl_div(F.log_softmax(s_rows, -1), F.log_softmax(t_rows, -1), log_target=True,
                          reduction="sum")
            (kl / sequences).backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        schedule.step()


def side_by_side(config: BakeConfig, log, keep: str) -> dict:
    """The loops timed side by side (run with the allocator's defaults: no memory measured);
    the trajectories are saved to ``keep`` for ``loop_memory``."""
    setup = Loops(config)
    setup.trajectories.save(Path(keep))
    framing, pad, total, every = setup.framing, setup.pad, setup.total, setup.every
    held_out = contexts_mod.for_bake(None, "held_out", config.eval_contexts)
    held_traj = sample_trajectories(setup.lm, setup.tokenizer,
                                    [framing.teacher_ids(c) for c in held_out],
                                    config, "none", seed=config.seed + 1, samples=1)
    before = mc_kl.kl_on(setup.lm, framing, held_out, held_traj, {"base": BASE},
                         pad_id=pad)["base"]
    # The loops take turns, a segment of steps each between two checks: a slow spell of a
    # shared machine falls on all of them alike. (Run one after another, on 2026-12-07, every
    # bf16 step of the first loops took ~1.5x its usual time while the fp32 ones did not.)
    log(f"    {', '.join(LOOPS)}: {total} steps each, {every} at a time in turns")
    runs = {name: setup.fresh(name) for name in LOOPS}
    clocks = {name: 0.0 for name in LOOPS}
    curves, step_seconds = {name: [] for name in LOOPS}, {name: [] for name in LOOPS}
    for done in range(0, total, every):  # timed segments, each followed by an untimed check
        segment = range(done, min(done + every, total))
        for name, (model, train) in runs.items():
            model.train()
            start = time.perf_counter()  # promptbake's set-up (for_training) counts too
            train(segment, step_seconds[name])
            clocks[name] += time.perf_counter() - start
            model.eval()
            kl = mc_kl.kl_on(model, framing, held_out, held_traj, {"b": BAKED}, pad_id=pad)["b"]
            curves[name].append({"step": segment.stop, "train_seconds": clocks[name],
                                 "kl": kl.to_dict(), "reduction": mc_kl.reduction(before, kl)[0]})
        log(f"      step {segment.stop}: " + ", ".join(
            f"{name} {clocks[name]:.0f} s" for name in LOOPS))
    del runs
    loops = {name: {"curve": curves[name], "step_seconds_median": statistics.median(xs)}
             for name, xs in step_seconds.items()}
    # The same KL for all: the worst of the final ones, which every loop reaches.
    target = max(loops[n]["curve"][-1]["kl"]["per_sequence"] for n in loops)
    for info in loops.values():
        info["seconds_to_target"] = next(p["train_seconds"] for p in info["curve"]
                                         if p["kl"]["per_sequence"] <= target + 1e-12)
    reference = loops["reference"]["seconds_to_target"]
    return {"before": before.to_dict(), "steps": total, "target_kl_per_sequence": target,
            "precision": "bf16" if config.autocast_dtype(torch.device("cpu")) else "fp32",
            "speedup": reference / loops["promptbake"]["seconds_to_target"],
            "speedup_unfused": reference / loops["promptbake-unfused"]["seconds_to_target"],
            "speedup_fp32": reference / loops["promptbake-fp32"]["seconds_to_target"],
            "loops": loops}


def loop_memory(config: BakeConfig, log, trajectories: str) -> dict:
    """Each loop's peak resident memory while training, above what was resident before it,
    untimed, on the trajectories ``side_by_side`` saved: in a process whose allocator returns
    freed memory from the start (``harness.can_measure_memory``), over the steps whose batches
    hold the most response tokens (a fresh adapter and optimizer per loop: Adam's state is made
    in the first step, as in the timed run). As in a bake, the teacher's cached targets are in
    the process's own memory, and every loop has run those steps once before: the first pass
    over new shapes leaves the math libraries' kernels and buffers for them behind (the first
    loop measured without it read 771 MB, 243 MB a second time)."""
    if not harness.can_measure_memory():
        return {}
    setup = Loops(config, Trajectories.load(Path(trajectories)))
    plan = setup.trajectories
    if plan.full_logprobs is not None:  # resident, not pages of the file read as they are used
        plan.full_logprobs = plan.full_logprobs.clone()
    heavy = sorted(sorted(range(setup.total), key=lambda step: -sum(
        len(plan.responses[k]) for batch in batch_plan(step, plan, config) for k in batch))
        [:setup.every])
    for name in LOOPS:
        model, train = setup.fresh(name)
        model.train()
        train(heavy, [])
        del model
    out = {}
    for name in LOOPS:
        log(f"    {name}: peak memory over {len(heavy)} steps")
        model, train = setup.fresh(name)
        model.train()
        out[name] = {"train_peak_extra_bytes": harness.peak_extra_bytes(
            functools.partial(train, heavy, [])), "memory_steps": heavy}
        del model
    return out


@contextlib.contextmanager
def unfused(enabled: bool):
    """The LM head applied before the loss, its N x V logits held (as before the fused head)."""
    saved = os.environ.get(FUSED_HEAD_ENV)
    if enabled:
        os.environ[FUSED_HEAD_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FUSED_HEAD_ENV, None)
        else:
            os.environ[FUSED_HEAD_ENV] = saved


def _padded(sequences, pad):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def checks(result) -> list[dict]:
    kl, every = result["manifest"]["kl"], result["all_held_out"]
    return [
        {"target": f"whole bake <= {TARGET_MINUTES:g} minutes",
         "measured": f"{result['whole_bake_seconds'] / 60:.2f} min",
         "pass": result["whole_bake_seconds"] <= TARGET_MINUTES * 60},
        {"target": f"held-out KL reduction >= {100 * TARGET_REDUCTION:.0f}%",
         "measured": f"{100 * kl['reduction']:.1f}% ± {100 * kl['reduction_se']:.1f}%",
         "pass": kl["reduction"] >= TARGET_REDUCTION},
        {"target": f"... on every held-out context ({every['before']['sequences']}), fresh samples",
         "measured": f"{100 * every['reduction']:.1f}% ± {100 * every['reduction_se']:.1f}%",
         "pass": every["reduction"] >= TARGET_REDUCTION},
        {"target": f">= {TARGET_SPEEDUP:g}x faster than the reference loop to the same KL",
         "measured": f"{result['loops']['speedup']:.2f}x ({result['loops']['precision']}; "
                     f"{result['loops']['speedup_unfused']:.2f}x with the head unfused, "
                     f"{result['loops']['speedup_fp32']:.2f}x in fp32)",
         "pass": result["loops"]["speedup"] >= TARGET_SPEEDUP},
    ]


def report(result) -> str:
    m = result["manifest"]
    kl, every = m["kl"], result["all_held_out"]
    lines = [f"prompt: {result['prompt']}",
             f"whole bake: {result['whole_bake_seconds']:.0f} s  (" + ", ".join(
                 f"{k} {v:.0f}s" for k, v in m["wall_seconds"].items() if k != "total") + ")",
             f"KL(prompted || base)  {kl['before']['per_token']:.4f} ± {kl['before']['per_token_se']:.4f}"
             f" nats/token, {kl['before']['per_sequence']:.2f} ± {kl['before']['per_sequence_se']:.2f}"
             f" /sequence ({kl['before']['sequences']} held-out samples)",
             f"KL(prompted || baked) {kl['after']['per_token']:.4f} ± {kl['after']['per_token_se']:.4f}"
             f" nats/token, {kl['after']['per_sequence']:.2f} ± {kl['after']['per_sequence_se']:.2f}"
             f" /sequence",
             f"reduction {100 * kl['reduction']:.1f}% ± {100 * kl['reduction_se']:.1f}%",
             f"on every held-out context ({every['before']['sequences']}, fresh samples): "
             f"{every['before']['per_token']:.4f} -> {every['after']['per_token']:.4f} nats/token, "
             f"reduction {100 * every['reduction']:.1f}% ± {100 * every['reduction_se']:.1f}%", ""]
    side = result["loops"]
    loops = side["loops"]
    body = []
    for name in loops:
        info = loops[name]
        for p in info["curve"]:
            body.append([name, p["step"], f"{p['train_seconds']:.0f}", f"{p['kl']['per_token']:.4f}",
                         f"{100 * p['reduction']:.1f}%"])
    lines.append(f"side by side, {side['steps']} steps on the same trajectories; median step: " +
                 ", ".join(f"{n} {i['step_seconds_median']:.2f} s" for n, i in loops.items()))
    lines.append("peak resident memory while training, above the loop's start: " + ", ".join(
        f"{n} {_mb(i.get('train_peak_extra_bytes'))} MB" for n, i in loops.items())
        + f"; the whole bake's process peaked at {_mb(result.get('whole_bake_peak_rss_bytes'))} "
        f"MB resident")
    lines.append(harness.table(["loop", "step", "train s", "held-out KL/token", "reduction"], body))
    lines.append(f"time to the same held-out KL ({side['target_kl_per_sequence']:.2f} nats/sequence): " +
                 ", ".join(f"{n} {i['seconds_to_target']:.0f} s" for n, i in loops.items()) +
                 f" -> {side['speedup']:.2f}x ({side['precision']} matmuls), "
                 f"{side['speedup_unfused']:.2f}x with the head unfused, "
                 f"{side['speedup_fp32']:.2f}x with fp32 matmuls")
    lines.append("")
    for a in result["answers"]:
        lines.append(f"Q: {a['question']}")
        for mode in ("base", "prompted", "baked"):
            lines.append(f"  {mode:>8}: {a[mode][:160]!r}")
    lines.append("")
    lines.append(harness.checks_table(result["checks"]))
    return "\n".join(lines)


def markdown(result) -> str:
    kl = result["manifest"]["kl"]
    loops = result["loops"]["loops"]
    rows = harness.checks_markdown(result["checks"])
    lines = [f"`{result['command']}` — {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} threads, {result['machine']['date'][:10]}",
             "", *rows, "",
             f"KL(prompted ‖ base) {kl['before']['per_token']:.4f} ± {kl['before']['per_token_se']:.4f}"
             f" → KL(prompted ‖ baked) {kl['after']['per_token']:.4f} ± "
             f"{kl['after']['per_token_se']:.4f} nats/token on {kl['before']['sequences']} "
             f"held-out samples; phases: " + ", ".join(
                 f"{k} {v:.0f} s" for k, v in result["manifest"]["wall_seconds"].items())
             + f"; median training step {loops['promptbake']['step_seconds_median']:.2f} s "
             f"(head unfused {loops['promptbake-unfused']['step_seconds_median']:.2f} s, "
             f"reference {loops['reference']['step_seconds_median']:.2f} s); peak resident "
             f"memory while training {_mb(loops['promptbake']['train_peak_extra_bytes'])} MB "
             f"above the loop's start (head unfused "
             f"{_mb(loops['promptbake-unfused']['train_peak_extra_bytes'])} MB, reference "
             f"{_mb(loops['reference']['train_peak_extra_bytes'])} MB); the whole bake, run "
             f"in a process of its own, {result['whole_bake_process_seconds']:.0f} s with "
             f"start-up and {_mb(result.get('whole_bake_peak_rss_bytes'))} MB resident at "
             f"its peak."]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("promptbake", "o-"), ("promptbake-unfused", "x-"),
                        ("promptbake-fp32", "^-"), ("reference", "s--")):
        curve = result["loops"]["loops"][name]["curve"]
        axes[0].plot([p["train_seconds"] for p in curve], [p["kl"]["per_token"] for p in curve],
                     style, label=name)
        axes[1].plot([p["step"] for p in curve], [p["kl"]["per_token"] for p in curve], style,
                     label=name)
    for ax, xlabel in zip(axes, ("training wall time, s", "optimizer step")):
        ax.axhline(result["loops"]["before"]["per_token"], color="grey", lw=0.8, ls=":",
                   label="base (no prompt)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out KL(prompted || model), nats/token")
        ax.legend()
    axes[0].set_title("same trajectories and hyperparameters")
    axes[1].set_title(f"whole bake {result['whole_bake_seconds']:.0f} s, reduction "
                      f"{100 * result['manifest']['kl']['reduction']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
