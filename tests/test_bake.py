"""The bake on a tiny random Llama with SmolLM2's tokenizer: it learns, it saves what PEFT loads,
it resumes exactly, and it never loses or half-writes files."""

import errno
import json
import logging
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import promptbake
from promptbake import BakeConfig, bake, load_baked
from promptbake.framing import FramingError
from promptbake.mc_kl import mc_kl
from promptbake.train import Divergence


def tiny_config(**changes) -> BakeConfig:
    base = dict(train_contexts=4, eval_contexts=3, samples_per_context=2, max_new_tokens=8,
                sample_batch=8, batch_size=4, steps=6, lr=2e-2, warmup=0.0, checkpoint_every=2)
    return BakeConfig(**{**base, **changes})


def adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_bake_learns_and_writes_a_self_describing_directory(tiny_dir, tmp_path, prompt):
    out = tmp_path / "baked"
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=8), out=out)
    kl = baked.manifest["kl"]
    assert kl["after"]["per_sequence"] < kl["before"]["per_sequence"]
    assert 0 < kl["reduction"] <= 1 and kl["reduction_se"] >= 0
    history = baked.manifest["train_kl_per_token"]
    assert len(history) == 8 and history[-1][1] < history[0][1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"]["text"] == prompt
    assert manifest["base_model"]["sha256"] and manifest["config"]["rank"] == 8
    assert manifest["framing"]["student"] == "default"
    assert set(manifest["wall_seconds"]) >= {"load", "sample", "measure_before", "train",
                                             "measure_after", "save", "total"}
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json",
            "eval_trajectories.safetensors", ".promptbake.json"} <= names
    assert not names & {"checkpoint.safetensors", "trajectories.safetensors"}  # resume-only
    assert not [n for n in names if ".tmp-" in n or ".old-" in n]
    assert json.loads((out / ".promptbake.json").read_text())["status"] == "done"


@pytest.fixture(scope="module")
def baked_dir(tiny_dir, tmp_path_factory, prompt):
    out = tmp_path_factory.mktemp("baked") / "pirate"
    bake(prompt, model=tiny_dir, config=tiny_config(snapshot_every=2, merge=True), out=out)
    return out


def logits(model, ids=(1, 2, 3, 4, 5)):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def test_adapter_loads_with_peft_and_strength_scales_it(tiny_dir, baked_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reference = logits(base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), baked_dir)
    baked = load_baked(baked_dir)
    torch.testing.assert_close(logits(peft_model), logits(baked.model))
    assert not torch.allclose(logits(baked.model), reference)
    baked.strength = 0.0  # the LoRA delta scaled to nothing: the base model
    torch.testing.assert_close(logits(baked.model), reference)
    half = load_baked(baked_dir, strength=0.5)
    assert half.strength == 0.5
    assert not torch.allclose(logits(half.model), reference)


def test_snapshots_do_not_change_the_bake(tiny_dir, tmp_path, prompt):
    made = {every: bake(prompt, model=tiny_dir, config=tiny_config(snapshot_every=every),
                        out=tmp_path / str(every)) for every in (0, 2)}
    assert (tmp_path / "2" / "snapshots").is_dir() and not (tmp_path / "0" / "snapshots").exists()
    plain, snapped = adapter_tensors(tmp_path / "0"), adapter_tensors(tmp_path / "2")
    assert plain.keys() == snapped.keys()
    assert all(torch.equal(plain[k], snapped[k]) for k in plain)  # bit for bit
    assert made[0].manifest["kl"] == made[2].manifest["kl"]


def test_snapshots_and_merged_model(tiny_dir, baked_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    snapshots = sorted(p.name for p in (baked_dir / "snapshots").iterdir())
    assert snapshots == ["step-000002", "step-000004"]
    early = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                      baked_dir / "snapshots" / "step-000002")
    merged = AutoModelForCausalLM.from_pretrained(baked_dir / "merged")  # transformers alone
    baked = load_baked(baked_dir)
    torch.testing.assert_close(logits(merged), logits(baked.model), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(early), logits(baked.model))


def test_generate_answers_three_ways(baked_dir):
    baked = load_baked(baked_dir)
    answers = {mode: baked.generate("Hello?", variant=mode, max_new_tokens=5)
               for mode in ("base", "prompted", "baked")}
    assert all(isinstance(a, str) for a in answers.values())
    baked.strength = 0.0  # the LoRA delta scaled to nothing: the base model's greedy answer
    assert baked.generate("Hello?", variant="baked", max_new_tokens=5) == answers["base"]
    with pytest.raises(ValueError, match="unknown model variant 'teacher'"):
        baked.generate("Hello?", variant="teacher")


def test_resume_after_an_interrupt_gives_the_same_adapter(tiny_dir, tmp_path, monkeypatch, prompt):
    whole = tmp_path / "whole"
    bake(prompt, model=tiny_dir, config=tiny_config(), out=whole)
    expected = adapter_tensors(whole)

    cut = tmp_path / "cut"
    real_step, calls = Divergence.__call__, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # during step 5: the last checkpoint is step 4
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Divergence, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bake(prompt, model=tiny_dir, config=tiny_config(), out=cut)
    monkeypatch.setattr(Divergence, "__call__", real_step)
    assert (cut / "checkpoint.safetensors").is_file() and not (cut / "manifest.json").exists()
    bake(prompt, model=tiny_dir, config=tiny_config(), out=cut, resume=True)
    got = adapter_tensors(cut)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_killed_process_resumes_to_the_same_adapter(tiny_dir, tmp_path, prompt):
    args = [sys.executable, "-m", "promptbake.cli", "bake", "--prompt", prompt, "--model",
            str(tiny_dir), "--quiet", "--train-contexts", "4", "--eval-contexts", "3",
            "--max-new-tokens", "8", "--batch-size", "4", "--steps", "200", "--lr", "0.01",
            "--checkpoint-every", "1", "--sample-batch", "8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(args + ["--out", str(whole)], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(args + ["--out", str(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside training, possibly while a checkpoint is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "manifest.json").exists(), "the run finished before it could be killed"
    (cut / ".checkpoint.safetensors.tmp-999999").write_bytes(b"half")  # as a killed write leaves
    subprocess.run(args + ["--out", str(cut), "--resume"], check=True, capture_output=True,
                   timeout=600)
    assert not [p for p in cut.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    expected, got = adapter_tensors(whole), adapter_tensors(cut)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # the same files to the byte, though three processes wrote them (PEFT keeps the module names
    # in a set, safetensors its metadata in a map: both ordered differently in each process)
    records = [json.loads((d / "manifest.json").read_text())["files"] for d in (whole, cut)]
    assert {"adapter_config.json", "adapter_model.safetensors",
            "eval_trajectories.safetensors"} <= records[0].keys()
    assert records[0] == records[1]


def test_output_directory_is_never_clobbered(tiny_dir, tmp_path, prompt):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=foreign)
    with pytest.raises(ValueError, match="did not write"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "ours"
    bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=out)
    (out / "notes.txt").write_text("added by the user")
    with pytest.raises(ValueError, match="already finished"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=out, resume=True)
    with pytest.raises(ValueError, match="another prompt, configuration"):
        bake("Another prompt.", model=tiny_dir, config=tiny_config(steps=1), out=out, resume=True)
    with pytest.raises(ValueError, match="--overwrite replaces it: choose one"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=out, resume=True,
             overwrite=True)
    bake(prompt, model=tiny_dir, config=tiny_config(steps=2), out=out, overwrite=True)
    assert (out / "notes.txt").read_text() == "added by the user"  # overwrite kept it
    assert len(json.loads((out / "manifest.json").read_text())["train_kl_per_token"]) == 2
    with pytest.raises(ValueError, match="nothing to resume"):
        bake(prompt, model=tiny_dir, config=tiny_config(), out=tmp_path / "new", resume=True)


def test_out_of_disk_leaves_nothing_half_written(tiny_dir, tmp_path, monkeypatch, prompt):
    import promptbake.trajectories as trajectories

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trajectories, "save_file", full_disk)
    out = tmp_path / "full"
    with pytest.raises(OSError, match="out of disk space while writing .*trajectories"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=2), out=out)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not (out / "trajectories.safetensors").exists()
    monkeypatch.undo()
    bake(prompt, model=tiny_dir, config=tiny_config(steps=2), out=out, resume=True)
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("changes", [dict(teacher="live"), dict(teacher_cache="topk", topk=32),
                                     dict(loss="jsd", beta=0.5), dict(loss="reverse_kl"),
                                     dict(framing="none", grad_accum=2, schedule="linear")])
def test_teacher_and_loss_options_all_learn(tiny_dir, changes, prompt):
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=8, eval_contexts=8, train_contexts=8, **changes))
    history = baked.manifest["train_kl_per_token"]
    assert history[-1][1] < history[0][1]
    assert baked.manifest["kl"]["after"]["per_sequence"] < baked.manifest["kl"]["before"]["per_sequence"]


def test_in_memory_bake_can_be_saved(tiny_dir, tmp_path, prompt):
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=1))
    assert baked.path is None
    baked.save(tmp_path / "later")
    again = load_baked(tmp_path / "later")
    torch.testing.assert_close(logits(again.model), logits(baked.model))
    assert again.held_out == baked.held_out and len(again.held_out) == 3
    # Its held-out samples are drawn again with the bake's seed: the bake's own figure.
    assert mc_kl(again)["1"].per_sequence == pytest.approx(
        baked.manifest["kl"]["after"]["per_sequence"], rel=1e-4)
    bake(prompt, model=tiny_dir, config=tiny_config(steps=1), out=tmp_path / "later",
         overwrite=True)  # a saved bake is promptbake's to replace


def test_resume_refuses_another_model(tiny_dir, tmp_path, monkeypatch, prompt):
    import shutil

    out = tmp_path / "cut"
    real_step = Divergence.__call__

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Divergence, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bake(prompt, model=tiny_dir, config=tiny_config(), out=out)
    monkeypatch.setattr(Divergence, "__call__", real_step)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_dir, other)
    with pytest.raises(ValueError, match="another prompt, configuration, model"):
        bake(prompt, model=other, config=tiny_config(), out=out, resume=True)
    # The same directory with changed weights: caught by the weights' hash.
    from safetensors.torch import load_file as load, save_file as save

    weights = load(str(tiny_dir / "model.safetensors"))
    shutil.copytree(tiny_dir, tmp_path / "saved")
    weights = {k: v + 0.01 for k, v in weights.items()}
    save(weights, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    try:
        with pytest.raises(ValueError, match="weights changed"):
            bake(prompt, model=tiny_dir, config=tiny_config(), out=out, resume=True)
    finally:
        shutil.copy(tmp_path / "saved" / "model.safetensors", tiny_dir / "model.safetensors")


def test_unconditional_bake_samples_every_context_slot(tiny_dir, prompt):
    baked = bake(prompt, model=tiny_dir, contexts="none", config=tiny_config(steps=4))
    manifest = baked.manifest
    assert manifest["contexts"] == {"source": "none", "train": 4, "held_out": 3,
                                    "held_out_file": "held_out_contexts.json"}
    assert manifest["trajectories"]["count"] == 4 * 2
    assert manifest["kl"]["before"]["sequences"] == 3
    assert all(v == v for v in manifest["kl"]["before"].values())  # no NaN errors


def test_contexts_from_a_list_are_measured_again_from_the_directory(tiny_dir, tmp_path, prompt):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(30)]
    out = tmp_path / "listed"
    bake(prompt, model=tiny_dir, contexts=questions, config=tiny_config(steps=2), out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["contexts"]["source"] == "list"
    again = load_baked(out)
    assert again.held_out and all(c[0]["content"] in questions for c in again.held_out)
    assert mc_kl(again)["1"].per_sequence == pytest.approx(
        manifest["kl"]["after"]["per_sequence"], rel=1e-4)
    # Another set, named explicitly, is measured whole.
    assert mc_kl(again, questions[:4])["base"].sequences == 4


def test_asking_for_more_contexts_than_there_are_says_so(tiny_dir, prompt, caplog):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(30)]
    with caplog.at_level(logging.WARNING, logger="promptbake"):
        baked = bake(prompt, model=tiny_dir, contexts=questions,
                     config=tiny_config(steps=1, train_contexts=100, probe_contexts=2))
    used = baked.manifest["contexts"]["train"]
    assert used < 100
    assert f"--train-contexts asks for 100 training contexts; there are {used}" in caplog.text
    assert "--eval-contexts" not in caplog.text and "--probe-contexts" not in caplog.text


def test_bad_input(tiny_dir, tmp_path, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        bake("  ", model=tiny_dir, config=tiny_config())
    with pytest.raises(FramingError, match="exceeds the model's window of 512"):
        bake("Arr! " * 600, model=tiny_dir, config=tiny_config())
    with pytest.raises(ValueError, match="lr=0"):
        bake(prompt, model=tiny_dir, config=tiny_config(lr=0))
    with pytest.raises(ValueError, match="no finished bake"):
        load_baked(tmp_path)
    assert promptbake.BakeConfig is BakeConfig and promptbake.bake is bake


def test_a_conversation_prompt_bakes_and_loads_back(tiny_dir, tmp_path):
    """Few-shot demonstrations as the prompt: the whole prefix is the teacher's, the manifest
    keeps the messages, and load_baked frames them again."""
    demo = [{"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."}]
    out = tmp_path / "demo"
    baked = bake(demo, model=tiny_dir, config=tiny_config(steps=2), out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"]["messages"] == demo
    assert json.loads(manifest["prompt"]["text"]) == [dict(sorted(m.items())) for m in demo]
    again = load_baked(out)
    assert again.prompt == demo and again.framing.teacher_messages([]) == demo
    assert baked.manifest["kl"]["before"]["per_token"] > 0
    with pytest.raises(ValueError, match="prompt message 0"):
        bake([{"role": "narrator", "content": "x"}], model=tiny_dir, config=tiny_config())


def test_every_bake_measures_the_off_distribution_probes(tiny_dir, tmp_path, prompt):
    out = tmp_path / "probed"
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=2, probe_contexts=8), out=out)
    off = baked.manifest["kl_off_distribution"]
    assert off["contexts"] == 8 == off["before"]["sequences"] and len(off["kinds"]) == 8
    assert off["reduction"] == pytest.approx(
        1 - off["after"]["per_token"] / off["before"]["per_token"], rel=1e-6)
    again = load_baked(out)  # measured again from the directory's own samples: the same number
    assert mc_kl(again, "probe")["1"].per_token == pytest.approx(off["after"]["per_token"],
                                                               rel=1e-4)
    assert "kl_off_distribution" not in bake(prompt, model=tiny_dir, config=tiny_config(
        steps=1, probe_contexts=0)).manifest


def test_pools_with_a_generated_pool_record_the_mix(tiny_dir, tmp_path, prompt, monkeypatch):
    from promptbake import generated

    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    asked = []

    def fake(model, tokenizer, prompt, n, say=None, **settings):
        asked.append((n, settings.get("kinds")))
        texts = [f"Generated question {i} about the sea and its {i} ships?" for i in range(n)]
        return generated.Generated([[{"role": "user", "content": t}] for t in texts],
                                   ["chit-chat"] * n, n, {"short": 1}, {}, settings)

    monkeypatch.setattr(generated, "generate", fake)
    out = tmp_path / "pooled"
    baked = bake(prompt, model=tiny_dir, contexts="short=1,generated-general=1",
                 config=tiny_config(steps=1, train_contexts=10, eval_contexts=4), out=out)
    contexts = baked.manifest["contexts"]
    assert contexts["source"] == "short=1,generated-general=1"
    mix = contexts["pools"]
    assert mix["short"]["train"] == mix["generated-general"]["train"] == 5
    assert mix["short"]["held_out"] + mix["generated-general"]["held_out"] == 4  # short tops up
    assert asked[0][0] == 14  # enough for half of 10 + 4 after the 80/20 split
    assert contexts["generated"]["generated-general"]["contexts"] == asked[0][0]
    assert "domain" not in asked[0][1] and "follow-up" in asked[0][1]
    # generated:N: the bake's model writes N contexts, split into training and held-out parts
    baked = bake(prompt, model=tiny_dir, contexts="generated:20", config=tiny_config(steps=1))
    assert baked.manifest["contexts"]["source"] == "generated:20"
    assert baked.manifest["contexts"]["generated"]["contexts"] == 20 and asked[1][0] == 20


def test_bad_context_specs_are_refused_before_anything_is_written(tiny_dir, tmp_path, prompt):
    from promptbake.contexts import ContextError

    for spec, message in (("general=-1", "weights are finite"), ("generated:0", "generated:N"),
                          ("nowhere.jsonl=1", "unknown context pool")):
        with pytest.raises(ContextError, match=message):
            bake(prompt, model=tiny_dir, contexts=spec, config=tiny_config(), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: runs where CUDA exists")
def test_bake_on_the_gpu_matches_the_cpu(tiny_dir, prompt):
    """The default device is the GPU when there is one; the bake there follows the CPU's."""
    cfg = tiny_config(precision="fp32")
    on_gpu = bake(prompt, model=tiny_dir, config=cfg)
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    on_cpu = bake(prompt, model=tiny_dir, config=cfg, device="cpu")
    assert on_gpu.manifest["kl"]["before"]["per_token"] == pytest.approx(
        on_cpu.manifest["kl"]["before"]["per_token"], rel=1e-3)
    assert on_gpu.manifest["kl"]["reduction"] == pytest.approx(
        on_cpu.manifest["kl"]["reduction"], abs=0.02)


def test_a_gpu_that_is_not_there_is_a_clear_error(tiny_dir, prompt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="torch sees no GPU"):
        bake(prompt, model=tiny_dir, config=tiny_config(), out=tmp_path / "b", device="cuda")
    assert not (tmp_path / "b").exists()


def _tiny_variant(tiny_dir, path, seed: int, extra_vocab: int = 0):
    """Another tiny Llama beside ``tiny_dir`` (same tokenizer), with other random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_dir)
    config.vocab_size += extra_vocab
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


def test_a_teacher_model_that_is_the_same_weights_gives_the_same_bake(tiny_dir, tmp_path,
                                                                        prompt):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_dir, twin)
    config = tiny_config(steps=3)
    own = bake(prompt, model=tiny_dir, config=config)
    taught = bake(prompt, model=tiny_dir, config=config, teacher_model=twin)
    # The same trajectories and targets from a separate copy of the weights: the same adapter.
    for name, value in own.model.state_dict().items():
        torch.testing.assert_close(taught.model.state_dict()[name], value)
    for when in ("before", "after"):
        assert taught.manifest["kl"][when]["per_sequence"] == pytest.approx(
            own.manifest["kl"][when]["per_sequence"], rel=1e-5)
    assert taught.manifest["teacher_model"]["path"] == str(twin.resolve())
    assert "teacher_model" not in own.manifest
    # a teacher with the base model's weights is the base model: measured later against it
    assert mc_kl(taught)["1"].per_sequence == pytest.approx(
        taught.manifest["kl"]["after"]["per_sequence"], rel=1e-4)


def test_a_student_learns_another_models_prompted_distributions(tiny_dir, tmp_path, prompt):
    from promptbake import models
    from promptbake.artifact import RunDir
    from promptbake.framing import Framing
    from promptbake.mc_kl import kl_on
    from promptbake.modeling import BAKED, BASE

    teacher_dir = _tiny_variant(tiny_dir, tmp_path / "teacher", seed=7)
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=8, lr=3e-2),
                 teacher_model=teacher_dir, out=tmp_path / "out")
    kl = baked.manifest["kl"]
    assert kl["after"]["per_sequence"] < kl["before"]["per_sequence"]  # it learns
    assert kl["measured_on"].endswith("the teacher is teacher with the prompt, not the base "
                                      "model")
    assert baked.manifest["teacher_model"]["sha256"] == models.fingerprint(teacher_dir)
    # The manifest's figures are KL(teacher with u || student) on the bake's held-out samples,
    # measured again here with the teacher loaded apart.
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    framing = Framing(baked.tokenizer, prompt, baked.manifest["framing"]["student"])
    trajectories = RunDir(tmp_path / "out", identity="").load_trajectories("eval_trajectories")
    found = kl_on(baked.model, framing, baked.held_out, trajectories,
                  {"base": BASE, "baked": BAKED}, pad_id=baked.tokenizer.pad_token_id,
                  teacher=(teacher, framing))
    assert found["base"].per_sequence == pytest.approx(kl["before"]["per_sequence"], rel=1e-4)
    assert found["baked"].per_sequence == pytest.approx(kl["after"]["per_sequence"], rel=1e-4)
    # ... which are not the student's own prompted model's
    own = kl_on(baked.model, framing, baked.held_out, trajectories, {"base": BASE},
                pad_id=baked.tokenizer.pad_token_id)["base"]
    assert abs(own.per_sequence - kl["before"]["per_sequence"]) > 0.1 * own.per_sequence
    # measured later, it is measured against that teacher (found where the manifest says)
    out = tmp_path / "out"
    again = mc_kl(load_baked(out))
    assert again["base"].per_sequence == pytest.approx(kl["before"]["per_sequence"], rel=1e-4)
    assert again["1"].per_sequence == pytest.approx(kl["after"]["per_sequence"], rel=1e-4)
    # where no teacher is given, its own base model with the prompt is refused as the reference
    from promptbake.mc_kl import held_out_samples, teacher_of

    with pytest.raises(ValueError, match="prompted distributions of another model"):
        held_out_samples(load_baked(out))
    # a teacher that moved is given by its directory; other weights are refused
    moved = tmp_path / "moved"
    teacher_dir.rename(moved)
    with pytest.raises(ValueError, match="is not a directory: give the teacher's directory"):
        mc_kl(load_baked(out))
    with pytest.raises(ValueError, match="is not the teacher this bake learned from"):
        teacher_of(load_baked(out), tiny_dir)
    from promptbake.cli import main

    assert main(["kl", str(out), "--teacher-model", str(moved), "--strength", "0,1"]) == 0
    measured = json.loads((out / "strength.json").read_text())
    assert measured["points"]["1"]["per_sequence"] == pytest.approx(
        kl["after"]["per_sequence"], rel=1e-4)
    # an export measures what it keeps against that teacher too
    from promptbake.export import export_baked

    moved.rename(teacher_dir)
    exported = export_baked(out, tmp_path / "onnx").manifest["held_out_kl"]
    assert exported["base"]["per_sequence"] == pytest.approx(kl["before"]["per_sequence"],
                                                             rel=1e-4)
    assert exported["onnx"]["per_token"] == pytest.approx(kl["after"]["per_token"], rel=1e-3,
                                                          abs=1e-5)


def test_a_teacher_bake_is_evaluated_against_its_teacher(tiny_dir, tmp_path, plain_prompt,
                                                         derived_answers, monkeypatch, capsys):
    # Every "prompted" reference of a bake from a separate teacher is that teacher with u: the
    # re-prompt matrix's prompted cell, the derived persona's prompted exemplars, drift's
    # prompted mode; the report says so. The student's base model is the "base" side.
    from transformers import AutoModelForCausalLM

    from promptbake import drift as drift_mod, modeling, persona as persona_mod
    from promptbake.forgetting import check_suite
    from promptbake.mc_kl import teacher_of
    from promptbake.report import report
    from promptbake.tasks import Score

    teacher_dir = _tiny_variant(tiny_dir, tmp_path / "teacher", seed=7)
    out = tmp_path / "out"
    bake(plain_prompt, model=tiny_dir, config=tiny_config(steps=1), teacher_model=teacher_dir,
         out=out)
    theirs = AutoModelForCausalLM.from_pretrained(teacher_dir).get_input_embeddings().weight

    def who(model) -> str:
        weight = modeling.inner(model).get_input_embeddings().weight
        return "teacher" if torch.equal(weight, theirs) else "student"

    answered, conversed = [], []  # (which model, with the prompt?) per call
    canned, run = persona_mod.greedy, drift_mod.drift

    def greedy(model, prefixes, **options):
        answered.append(who(model))
        return canned(model, prefixes, **options)

    def drift(model, *args, **options):
        conversed.append((who(model), options.get("system") is not None))
        return run(model, *args, **options)

    monkeypatch.setattr(persona_mod, "greedy", greedy)
    monkeypatch.setattr(drift_mod, "drift", drift)
    record = report(out, tasks=[], turns=1, conversations=1, strengths=(1,), drift_tokens=3)
    assert record["teacher_model"]["path"] == str(teacher_dir.resolve())
    # derived_answers saw the prompted answers asked first, then the base ones
    assert [prompted for prompted, _, _ in derived_answers] == [True, False]
    assert answered == ["teacher", "student"]
    assert conversed == [("teacher", True), ("student", False)]
    text = (out / "report.md").read_text()
    assert "learned the prompted behaviour of the teacher model teacher" in text
    baked = load_baked(out)

    def evaluator(model, tokenizer, system, framing="default"):
        items = [{"id": f"i{i}", "score": float(who(model) == "teacher")} for i in range(4)]
        return Score.from_items("who", items, None)

    suite = check_suite(baked, [evaluator], teacher=teacher_of(baked))
    cells = suite.matrices["evaluator"].cells
    assert {name: cell.value for name, cell in cells.items()} == {
        "base": 0.0, "prompted": 1.0, "baked": 0.0, "baked+prompt": 0.0}
    with pytest.raises(ValueError, match="use scripted user turns"):
        drift_mod.drift_modes(baked, teacher=teacher_of(baked), user="self")
    # without the teacher, "prompted" is refused rather than quietly the wrong model
    for refused in (lambda: check_suite(baked, [evaluator]),
                    lambda: drift_mod.drift_modes(baked, modes=("prompted",)),
                    lambda: persona_mod.persona_of(baked)):
        with pytest.raises(ValueError, match="compare it with that teacher"):
            refused()
    from promptbake import cli

    assert cli.main(["drift", str(out), "--user", "self"]) == 2
    assert "use --user scripted" in capsys.readouterr().err
    assert cli.main(["chat", str(out), "--question", "Hi", "--max-new-tokens", "2"]) == 0
    assert "prompted (the teacher teacher)" in \
        capsys.readouterr().out


def test_a_teacher_model_is_refused_when_it_cannot_teach(tiny_dir, tmp_path, prompt):
    other = _tiny_variant(tiny_dir, tmp_path / "wide", seed=1, extra_vocab=8)
    with pytest.raises(ValueError, match="another vocabulary"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), teacher_model=other)
    from transformers import AutoTokenizer

    templated = _tiny_variant(tiny_dir, tmp_path / "templated", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(templated)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(templated)
    with pytest.raises(ValueError, match="another chat template"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1), teacher_model=templated)
    with pytest.raises(ValueError, match="not live"):
        bake(prompt, model=tiny_dir, config=tiny_config(steps=1, teacher="live"),
             teacher_model=tiny_dir)


def test_rehearsed_contexts_are_taught_by_their_own_prompt(tiny_dir, prompt, monkeypatch):
    import sys

    from promptbake.bake import Rehearsal
    from promptbake.framing import Framing

    bake_mod = sys.modules["promptbake.bake"]  # the package's ``bake`` is the function
    seen = []
    real = bake_mod.sample_trajectories

    def spy(model, tokenizer, prefixes, *args, **kwargs):
        seen.append(list(prefixes))
        return real(model, tokenizer, prefixes, *args, **kwargs)

    monkeypatch.setattr(bake_mod, "sample_trajectories", spy)
    objectives = []

    def divergence(trajectories, prefixes, *args):
        objectives.append(prefixes)
        return Divergence(trajectories, prefixes, *args)

    monkeypatch.setattr(bake_mod, "Divergence", divergence)
    other = "Answer in French."
    extra = ["Where is the station?", "What time is it?", "Name a fruit."]
    config = tiny_config(steps=None, epochs=1.0, train_contexts=4)
    baked = bake(prompt, model=tiny_dir, config=config, rehearse=[Rehearsal(other, extra, 2)])
    training = seen[0]  # the training trajectories' prefixes: the bake's own, then rehearsed
    assert len(training) == 6
    own = Framing(baked.tokenizer, prompt, config.framing)
    theirs = Framing(baked.tokenizer, other, config.framing)
    asked = [[{"role": "user", "content": c}] for c in extra]
    rehearsed = training[4:]
    assert all(any(ids == theirs.teacher_ids(c) for c in asked) for ids in rehearsed)
    assert not any(ids == own.teacher_ids(c) for ids in rehearsed for c in asked)
    # the student reads every context as it will be used: without any prompt
    students = [p[1] for p in objectives[0][4:]]
    assert all(any(ids == own.student_ids(c) for c in asked) for ids in students)
    assert baked.manifest["rehearsal"] == [{"prompt": other, "contexts": 2, "source": "list"}]
    assert baked.manifest["contexts"]["train"] == 4
    # epochs count every training context, rehearsed ones too: 6 contexts, 2 per step
    assert len(baked.manifest["train_kl_per_token"]) == 3
    with pytest.raises(ValueError, match="count >= 1"):
        bake(prompt, model=tiny_dir, config=config, rehearse=[(other, extra, 0)])
    with pytest.raises(ValueError, match="not rehearsed"):
        bake(prompt, model=tiny_dir, config=config, rehearse=[(other, "generated:8", 2)])


@pytest.mark.parametrize("changes, expected", [
    ({"precision": "bf16"}, None), ({"precision": "bf16", "sample_precision": "auto"},
                                    torch.bfloat16),
    ({"precision": "fp32", "sample_precision": "bf16"}, torch.bfloat16)])
def test_training_trajectories_are_sampled_at_the_sample_precision(tiny_dir, prompt, monkeypatch,
                                                                    changes, expected):
    """The teacher samples the training trajectories at ``sample_precision`` (fp32 by default,
    auto: ``precision``'s); held-out and probe samples, which measure the bake, always in fp32."""
    import sys

    bake_mod = sys.modules["promptbake.bake"]  # the package's ``bake`` is the function
    dtypes = []
    real = bake_mod.sample_trajectories

    def spy(*args, dtype=None, **kwargs):
        dtypes.append(dtype)
        return real(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(bake_mod, "sample_trajectories", spy)
    baked = bake(prompt, model=tiny_dir, config=tiny_config(steps=1, **changes))
    assert dtypes == [expected, None, None]  # training, held-out, probes
    assert baked.manifest["config"]["sample_precision"] == changes.get("sample_precision", "fp32")
