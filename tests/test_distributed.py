"""Data-parallel baking steps: two gloo ranks on the CPU take the same optimizer steps as one
process on the same trajectories (same loss curve, same adapter), each rank holding only its
contexts' trajectories and teacher cache; the same with the layers sharded (FSDP2), and a bake
whose rank dies resumes from its last checkpoint to the uninterrupted result."""

import json
import os
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from promptbake import BakeConfig, modeling
from promptbake.distributed import World, all_sum, full, shard, sum_gradients
from promptbake.framing import Framing
from promptbake.train import (Divergence, attach_lora, batch_plan, make_optimizer,
                              optimizer_step, sample_trajectories)
from promptbake.trajectories import Trajectories

CONTEXTS = [[{"role": "user", "content": q}] for q in
            ("What is the capital of France?", "How do I boil an egg?", "Hi!", "Name a river.",
             "Tell me a joke.", "What is 2 + 2?", "Describe the sea.")]  # 7: uneven shares
STEPS = 5


def config() -> BakeConfig:
    return BakeConfig(samples_per_context=2, max_new_tokens=6, sample_batch=8, batch_size=4,
                      grad_accum=2, steps=STEPS, lr=2e-2, warmup=0.0, precision="fp32")


def train(tiny_dir, prefixes, trajectories, pad, world, contexts, sharded=False):
    """(loss per step, the LoRA weights) after STEPS steps on ``trajectories``."""
    cfg = config()
    torch.manual_seed(cfg.seed)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg)
    if sharded:
        world = shard(model, world)
    optimizer, schedule = make_optimizer(model, cfg, STEPS)
    objective = Divergence(trajectories, prefixes, cfg, pad)
    model.train()
    losses = [optimizer_step(model, objective,
                             batch_plan(s, trajectories, cfg, world, contexts),
                             optimizer, schedule, cfg.max_grad_norm, world)
              for s in range(STEPS)]
    lora = {n: full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora


def _rank(rank, size, init, tiny_dir, shared, out, sharded=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        world = World.current()
        data = torch.load(shared, weights_only=False)
        everything = Trajectories.load(data["trajectories"])
        mine = everything.select(world.owns)
        assert set(mine.context_index) == {c for c in range(len(CONTEXTS)) if world.owns(c)}
        losses, lora = train(tiny_dir, data["prefixes"], mine, data["pad"], world,
                             len(CONTEXTS), sharded)
        if world.writes:
            torch.save({"losses": losses, "lora": lora}, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def sampled(tiny_dir, tokenizer, prompt, tmp_path):
    cfg = config()
    framing = Framing(tokenizer, prompt)
    prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in CONTEXTS]
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg)
    with modeling.BASE.active(model):
        trajectories = sample_trajectories(model, tokenizer, [p[0] for p in prefixes], cfg,
                                           "full", seed=0, samples=2)
    trajectories.save(tmp_path / "trajectories.safetensors")
    shared = tmp_path / "shared.pt"
    torch.save({"prefixes": prefixes, "pad": tokenizer.pad_token_id,
                "trajectories": tmp_path / "trajectories.safetensors"}, shared)
    return prefixes, trajectories, tokenizer.pad_token_id, shared


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_take_the_one_process_steps(tiny_dir, sampled, tmp_path, sharded):
    """Data parallel, and with FSDP2 (every layer's weights and LoRA sharded over the ranks,
    gradients reduce-scattered): the one-process loss curve and adapter. A step where a rank
    owns none of a micro-batch's contexts runs a stand-in batch weighted zero."""
    prefixes, trajectories, pad, shared = sampled
    want_losses, want_lora = train(tiny_dir, prefixes, trajectories, pad, World(), None)
    out = tmp_path / "rank0.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank, args=(2, init, str(tiny_dir), str(shared), str(out), sharded),
                       nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=False)
    assert got["losses"] == pytest.approx(want_losses, rel=1e-5)
    assert want_losses[0] > want_losses[-1]  # it trained
    assert got["lora"].keys() == want_lora.keys()
    for name, value in want_lora.items():  # Adam magnifies summation-order noise where g ~ 0
        torch.testing.assert_close(got["lora"][name], value, rtol=1e-4,
                                   atol=1e-3 * float(value.abs().max()))


def test_plan_shares_partition_the_one_process_plan(sampled):
    _, trajectories, _, _ = sampled
    cfg = config()
    for step in range(4):
        whole = batch_plan(step, trajectories, cfg)
        shares = []
        for rank in range(3):
            world = World(rank, 3)
            mine = trajectories.select(world.owns)
            plan = batch_plan(step, mine, cfg, world, len(CONTEXTS))
            # back to whole-set trajectory indices: (context, response) identifies one
            shares.append([[(mine.context_index[k], json.dumps(mine.responses[k])) for k in b]
                           for b in plan])
        for micro, batch in enumerate(whole):
            expected = sorted((trajectories.context_index[k], json.dumps(trajectories.responses[k]))
                              for k in batch)
            assert sorted(x for share in shares for x in share[micro]) == expected


def test_select_keeps_each_contexts_cache_rows(sampled):
    _, trajectories, _, _ = sampled
    odd = trajectories.select(lambda c: c % 2 == 1)
    assert set(odd.context_index) == {1, 3, 5}
    for k, c in enumerate(odd.context_index):
        j = [i for i, ci in enumerate(trajectories.context_index) if ci == c][
            odd.context_index[:k].count(c)]
        assert odd.responses[k] == trajectories.responses[j]
        torch.testing.assert_close(odd.full_logprobs[odd.rows([k])],
                                   trajectories.full_logprobs[trajectories.rows([j])])


def test_one_process_sums_are_identities():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert sum_gradients([p], World()) == 0 and p.grad.tolist() == [2.0, 2.0, 2.0]
    assert all_sum([1.5, 2], World()) == [1.5, 2]
    assert World.from_env() == World() or os.environ.get("WORLD_SIZE", "1") != "1"


BAKE = dict(train_contexts=5, eval_contexts=3, probe_contexts=2, samples_per_context=2,
            max_new_tokens=6, sample_batch=8, batch_size=4, steps=4, lr=2e-2, warmup=0.0,
            checkpoint_every=2, precision="fp32")


def _bake_rank(rank, size, init, tiny_dir, prompt, out, results, changes):
    from promptbake import bake

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        changes = dict(changes.get(rank, {}))
        run = {k: changes.pop(k) for k in ("fsdp", "resume") if k in changes}
        die_at = changes.pop("die_at", None)
        if die_at is not None:  # this rank dies after that step, as a killed process does
            from promptbake.train import TrainingLog

            logged = TrainingLog.log

            def log(self, step, *rest):
                if step == die_at:
                    os._exit(3)
                logged(self, step, *rest)

            TrainingLog.log = log
        cfg = BakeConfig(**{**BAKE, **changes})
        baked = bake(prompt, model=tiny_dir, config=cfg, out=out, **run)
        outcome = {"ok": True, "kl": baked.manifest["kl"]}
    except Exception as err:  # reported to the test, which asserts on it
        outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        dist.barrier()  # the other ranks stopped at the same check: let them read their last
    finally:
        dist.destroy_process_group()
    with open(results.format(rank=rank), "w") as f:
        json.dump(outcome, f)


def bake_on_ranks(size, tiny_dir, prompt, tmp_path, changes=None, out=None):
    out = out or tmp_path / "baked"
    results = str(tmp_path / "rank{rank}.json")
    rendezvous = tmp_path / f"rendezvous-{uuid.uuid4().hex}"  # a killed run leaves its own
    mp.start_processes(_bake_rank, args=(size, f"file://{rendezvous}",
                                         str(tiny_dir), prompt, str(out), results,
                                         changes or {}),
                       nprocs=size, start_method="spawn")
    return out, [json.loads(open(results.format(rank=r)).read()) for r in range(size)]


def test_two_rank_bake_writes_one_bake_that_peft_loads(tiny_dir, prompt, tmp_path):
    from peft import PeftModel

    from promptbake import files, load_baked
    from promptbake.artifact import HELD_OUT_SAMPLES, PROBE_SAMPLES

    out, outcomes = bake_on_ranks(2, tiny_dir, prompt, tmp_path)
    assert all(o["ok"] for o in outcomes), outcomes
    assert outcomes[0]["kl"] == outcomes[1]["kl"]  # pooled: every rank reports the same
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "fsdp": False}
    assert manifest["kl"]["before"]["sequences"] == 3  # both ranks' held-out shares
    assert manifest["kl"]["reduction"] > 0
    held = Trajectories.load(out / HELD_OUT_SAMPLES)
    assert sorted(held.context_index) == [0, 1, 2]
    assert sorted(Trajectories.load(out / PROBE_SAMPLES).context_index) == [0, 1]
    assert not [p.name for p in out.iterdir() if "rank" in p.name or "checkpoint" in p.name]
    assert files.read_marker(out)["status"] == "done"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out))
    assert load_baked(out).manifest["kl"] == manifest["kl"]

    # A resume must use the world size the trajectories were shared for.
    marker = files.read_marker(out)
    (out / files.MARKER).write_text(json.dumps({**marker, "status": "running"}))
    from promptbake import bake

    with pytest.raises(ValueError, match="ran on 2 process"):
        bake(prompt, model=tiny_dir, out=out, resume=True, config=BakeConfig(**BAKE))


def test_fsdp_bake_whose_rank_dies_resumes_to_the_uninterrupted_result(tiny_dir, prompt,
                                                                       tmp_path):
    """Two ranks, layers sharded (FSDP2): the bake writes one adapter peft loads, with the
    data-parallel bake's loss curve and KL. Rank 1 killed after step 3: the run stops, the
    step-2 checkpoint (gathered whole, written atomically) is intact, and --resume on two
    ranks finishes with the uninterrupted run's loss curve and adapter."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    both = {r: {"fsdp": True} for r in range(2)}
    whole, outcomes = bake_on_ranks(2, tiny_dir, prompt, tmp_path, both, tmp_path / "whole")
    assert all(o["ok"] for o in outcomes), outcomes
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "fsdp": True}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(whole))
    ddp, outcomes = bake_on_ranks(2, tiny_dir, prompt, tmp_path, None, tmp_path / "ddp")
    assert all(o["ok"] for o in outcomes), outcomes
    unsharded = json.loads((ddp / "manifest.json").read_text())
    losses = [kl for _, kl in manifest["train_kl_per_token"]]
    assert losses == pytest.approx([kl for _, kl in unsharded["train_kl_per_token"]], rel=1e-4)
    assert manifest["kl"]["after"]["per_token"] == pytest.approx(
        unsharded["kl"]["after"]["per_token"], rel=1e-4)

    out = tmp_path / "killed"
    dying = {0: {"fsdp": True}, 1: {"fsdp": True, "die_at": 3}}
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        bake_on_ranks(2, tiny_dir, prompt, tmp_path, dying, out)
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 2
    resumed = {r: {"fsdp": True, "resume": True} for r in range(2)}
    _, outcomes = bake_on_ranks(2, tiny_dir, prompt, tmp_path, resumed, out)
    assert all(o["ok"] for o in outcomes), outcomes
    again = json.loads((out / "manifest.json").read_text())
    assert [kl for _, kl in again["train_kl_per_token"]] == pytest.approx(losses, rel=1e-5)
    want = load_file(str(whole / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)


def test_ranks_with_different_settings_stop_before_work(tiny_dir, prompt, tmp_path):
    _, outcomes = bake_on_ranks(2, tiny_dir, prompt, tmp_path, {1: {"lr": 1e-2}})
    for o in outcomes:
        assert not o["ok"] and "differ between ranks" in o["error"], o


def test_more_ranks_than_contexts_is_refused(tiny_dir, prompt, tmp_path):
    _, outcomes = bake_on_ranks(3, tiny_dir, prompt, tmp_path, {r: {"probe_contexts": 2}
                                                              for r in range(3)})
    for o in outcomes:
        assert not o["ok"] and "3 ranks but only 2 contexts" in o["error"], o


def test_torchrun_runs_the_cli_bake(tiny_dir, prompt, tmp_path):
    """``torchrun --nproc-per-node 2 -m promptbake bake ...``: the CLI reads torchrun's
    environment, rank 0 prints and writes."""
    import subprocess
    import sys

    out = tmp_path / "baked"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "promptbake", "bake", "--prompt", prompt,
         "--model", str(tiny_dir), "--out", str(out), "--quiet", "--train-contexts", "4",
         "--eval-contexts", "2", "--probe-contexts", "2", "--steps", "2",
         "--max-new-tokens", "6", "--precision", "fp32"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("KL reduction") == 1  # one summary, from rank 0
    assert json.loads((out / "manifest.json").read_text())["distributed"] == {
        "world_size": 2, "fsdp": False}


def test_fsdp_needs_ranks_and_no_merge(tiny_dir, prompt, tmp_path):
    from promptbake import bake

    cfg = BakeConfig(**BAKE)
    with pytest.raises(ValueError, match="one process: launch with torchrun"):
        bake(prompt, model=tiny_dir, config=cfg, out=tmp_path / "a", fsdp=True)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="--merge needs the whole model"):
        bake(prompt, model=tiny_dir, config=BakeConfig(**BAKE, merge=True), fsdp=True)
