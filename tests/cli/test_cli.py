import json
import shutil
import subprocess
import sys

import pytest

from promptbake import cli


def test_backends_lists_all_three(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["cpp", "triton", "torch"]


def test_help_and_version_from_the_installed_command():
    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "--help"], capture_output=True,
                          text=True, check=True)
    assert "backends" in done.stdout
    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("promptbake ")


TINY = ["--train-contexts", "4", "--eval-contexts", "3", "--max-new-tokens", "8",
        "--batch-size", "4", "--steps", "4", "--lr", "0.02", "--sample-batch", "8", "--quiet"]


def test_bake_chat_and_kl(tiny_dir, tmp_path, capsys, prompt):
    out = tmp_path / "baked"
    assert cli.main(["bake", "--prompt", prompt, "--model", str(tiny_dir), "--out", str(out),
                     "--snapshot-every", "2"] + TINY) == 0
    printed = capsys.readouterr().out
    assert "KL reduction" in printed and "KL(prompted || base)" in printed
    assert "(off-distribution probes, 24 samples)" in printed
    assert cli.main(["chat", str(out), "--question", "Hello?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "--- base" in printed and "--- prompted" in printed and "--- baked" in printed
    assert cli.main(["kl", str(out), "--strength", "0,1", "--snapshots"]) == 0
    printed = capsys.readouterr().out
    strength_table = printed.split("\n\n")[0].splitlines()
    rows = {line.split()[0]: line.split() for line in strength_table if line.split()}
    assert rows["base"][1] == rows["0"][1]  # strength 0 is the base model
    manifest = json.loads((out / "manifest.json").read_text())
    assert rows["1"][1] == f"{manifest['kl']['after']['per_token']:.4f}"  # the bake's own samples
    steps = json.loads((out / "snapshots.json").read_text())["points"]
    assert set(steps) == {"2", "4"}  # the snapshot, and the final adapter
    strength = json.loads((out / "strength.json").read_text())
    assert steps["4"]["per_token"] == strength["points"]["1"]["per_token"]
    assert "off-distribution probes (24 samples" in printed
    assert strength["off_distribution"]["points"]["1"]["per_token"] == pytest.approx(
        manifest["kl_off_distribution"]["after"]["per_token"], rel=1e-4)
    for name in ("strength.json", "strength.png", "snapshots.png"):
        assert (out / name).is_file()


def test_prompt_from_a_file(tiny_dir, tmp_path, prompt):
    file = tmp_path / "prompt.txt"
    file.write_text(prompt + "\n", encoding="utf-8")
    assert cli.main(["bake", "--prompt-file", str(file), "--model", str(tiny_dir), "--out",
                     str(tmp_path / "b")] + TINY[:-3] + ["--steps", "1", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["prompt"]["text"] == prompt


def test_bad_input_exits_with_one_clear_line(tiny_dir, tmp_path, capsys, prompt, small_bake):
    backwards = tmp_path / "backwards.json"
    backwards.write_text('[{"role": "assistant", "content": "Arr."}, {"role": "user", '
                         '"content": "Talk like a pirate."}]')
    cases = [
        (["bake", "--prompt-file", str(backwards), "--model", str(tiny_dir), "--out",
          str(tmp_path / "x")], "the prompt ends with a user message"),
        (["kl", str(small_bake), "--teacher-model", str(tiny_dir)],
         "learned its own base model's prompted distributions, not a separate teacher"),
        (["bake", "--prompt", " ", "--model", str(tiny_dir), "--out", str(tmp_path / "x")],
         "prompt is empty"),
        (["bake", "--prompt-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x")],
         "prompt file not found"),
        (["bake", "--prompt", prompt, "--model", str(tmp_path / "nowhere"), "--out",
          str(tmp_path / "x")], "model directory not found"),
        (["bake", "--prompt", prompt, "--model", str(tiny_dir), "--out", str(tmp_path / "x"),
          "--contexts", str(tmp_path / "missing.jsonl")], "contexts file not found"),
        (["kl", str(tmp_path)], "no finished bake"),
        (["bake", "--tools", "shipped", "--teacher-model", str(tiny_dir), "--model",
          str(tiny_dir), "--out", str(tmp_path / "x")], "--teacher-model is not offered with"),
        (["bake", "--prompt", prompt, "--model", str(tiny_dir), "--teacher-model",
          str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "model directory not found"),
    ]
    for argv, message in cases:
        code = None
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # argparse / prompt-file errors
            code = stop.code
        assert code not in (0, None), argv
        assert message in capsys.readouterr().err + str(code), argv


def test_every_option_is_explained():
    import argparse

    commands = next(a for a in cli.build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "bake", "--help"],
                          capture_output=True, text=True, check=True)
    for option in ("--prompt", "--prompt-file", "--model", "--out", "--framing", "--teacher",
                   "--teacher-cache", "--rank", "--alpha", "--loss", "--lr", "--steps",
                   "--snapshot-every", "--merge", "--resume", "--overwrite", "--contexts"):
        assert option in done.stdout


def test_models_lists_the_default(capsys):
    assert cli.main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_evaluate_pursue_and_export(tiny_dir, tmp_path, capsys, prompt):
    out = tmp_path / "baked"
    prompt += " Keep it short."  # not the built-in persona's prompt
    assert cli.main(["bake", "--prompt", prompt, "--model", str(tiny_dir), "--out", str(out)]
                    + TINY) == 0
    capsys.readouterr()
    task = tmp_path / "colours.jsonl"
    task.write_text("".join(json.dumps({"id": f"c{i}", "prompt": f"Colour {i}?",
                                        "choices": ["Red", "Blue"], "answer": i % 2}) + "\n"
                            for i in range(4)))
    record = tmp_path / "scores.json"
    assert cli.main(["evaluate", str(out), "--tasks", str(task), "--json", str(record)]) == 0
    printed = capsys.readouterr().out
    assert "| without u |" in printed and "forgetting gate:" in printed
    assert set(json.loads(record.read_text())["reprompt"]["colours"]["cells"]) == \
        {"base", "prompted", "baked", "baked+prompt"}
    assert cli.main(["evaluate", str(tiny_dir), "--tasks", str(task), "--system", prompt]) == 0
    assert "colours" in capsys.readouterr().out

    pursued = tmp_path / "pursued"
    assert cli.main(["pursue", str(out), "--out", str(pursued), "--rounds", "1", "--steps", "2",
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "stopped:" in printed and (pursued / "pursuit.json").is_file()

    drifted = tmp_path / "drift"
    assert cli.main(["drift", str(out), "--persona", "pirate", "--turns", "3",
                     "--conversations", "2", "--max-new-tokens", "4", "--out", str(drifted),
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "baked minus prompted drift:" in printed and (drifted / "drift.png").is_file()
    record = json.loads((drifted / "drift.json").read_text())
    assert set(record) == {"prompted", "baked"} and record["baked"]["turns"] == 3

    merged = tmp_path / "merged"
    assert cli.main(["export", str(out), "--format", "safetensors", "--strength", "0.5",
                     "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file()
    onnx_dir = tmp_path / "onnx"
    assert cli.main(["export", str(out), "--out", str(onnx_dir)]) == 0
    printed = capsys.readouterr().out
    assert "parity" in printed and (onnx_dir / "model.onnx").is_file()
    assert cli.main(["export", str(out), "--out", str(onnx_dir)]) == 2  # exists: refused
    assert "earlier onnx export" in capsys.readouterr().err
    assert cli.main(["export", str(out), "--format", "safetensors", "--quantize", "int8",
                     "--out", str(tmp_path / "x")]) == 2


def test_drift_of_a_prompt_without_a_persona(plain_bake, tmp_path, capsys, derived_answers,
                                             file_hashes):
    before = file_hashes(plain_bake)
    out = tmp_path / "drift"
    assert cli.main(["drift", str(plain_bake), "--turns", "2", "--conversations", "2",
                     "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "adherence scorer: derived from the prompt, 16 exemplar pairs" in printed
    assert "baked minus prompted drift:" in printed
    record = json.loads((out / "drift.json").read_text())
    assert record["baked"]["settings"]["scorer"] == "derived from the prompt, 16 exemplar pairs"
    assert record["baked"]["settings"]["rule_weight"] == 0
    assert record["baked"]["scores"]["adherence"] == record["baked"]["scores"]["semantic"]
    assert file_hashes(plain_bake) == before


def test_drift_refuses_bad_modes_before_loading_anything(tmp_path, capsys):
    for modes in ("prompted,bakd", ","):
        assert cli.main(["drift", str(tmp_path / "nowhere"), "--modes", modes]) == 2
        assert "choose one or more of prompted, baked, base" in capsys.readouterr().err


# -- damaged bakes, bad settings, unwritable outputs: one line, exit 2 -------------------------


def test_cli_export_onto_the_bake_exits_2_and_keeps_it(bake_copy, capsys, file_hashes):
    before = file_hashes(bake_copy)
    assert cli.main(["export", str(bake_copy), "--format", "safetensors", "--out",
                     str(bake_copy), "--overwrite"]) == 2
    assert "the directory it is made from" in capsys.readouterr().err
    assert file_hashes(bake_copy) == before


@pytest.mark.parametrize("command", [
    ["chat", "{dir}", "--question", "hi"],
    ["kl", "{dir}"],
    ["evaluate", "{dir}", "--tasks", "sentiment", "--limit", "2"],
    ["report", "{dir}", "--tasks", "none"],
    ["export", "{dir}", "--out", "{tmp}/out"],
    ["drift", "{dir}", "--persona", "pirate", "--turns", "1"],
    ["pursue", "{dir}", "--out", "{tmp}/pursued"],
])
@pytest.mark.parametrize("damage", ["truncated adapter", "foreign manifest"])
def test_every_command_names_a_damaged_bake_and_exits_2(bake_copy, tmp_path, capsys, command,
                                                       damage):
    if damage == "truncated adapter":
        adapter = bake_copy / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:5])
        named = "adapter_model.safetensors is damaged"
    else:
        (bake_copy / "manifest.json").write_text(json.dumps({"x": 1}))
        named = "manifest.json is not a promptbake bake's manifest"
    argv = [a.format(dir=bake_copy, tmp=tmp_path) for a in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_lr_inf_before_making_the_directory(tiny_dir, tmp_path, capsys, prompt):
    out = tmp_path / "out"
    assert cli.main(["bake", "--prompt", prompt, "--model", str(tiny_dir), "--out", str(out),
                     "--lr", "inf", "--quiet"]) == 2
    assert "lr=inf must be a finite number" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
    check=False).returncode != 0, reason="needs a user and mount namespace for a read-only mount")
def test_a_read_only_out_is_refused_before_loading_the_model(tiny_dir, tmp_path):
    """A read-only mount, as a user meets it (root's privileges ignore permission bits, a
    read-only mount stops everyone)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (f"mount --bind -o ro {readonly} {readonly} && exec {sys.executable} -m "
              f"promptbake.cli bake --prompt 'x y' --model {tiny_dir} --out {readonly}/pirate "
              f"--quiet --contexts no-such-file.txt")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    # named before the contexts file is even read (that would be the next error)
    assert f"cannot write to {readonly} (Read-only file system)" in done.stderr
    assert ".tmp-" not in done.stderr and list(readonly.iterdir()) == []


def test_a_missing_sandbox_stops_evaluate_before_any_scoring(bake_copy, monkeypatch, capsys):
    from promptbake.tasks import sandbox

    monkeypatch.setattr(sandbox, "unavailable", lambda: "no user namespaces (a test)")
    monkeypatch.delenv("PROMPTBAKE_SANDBOX", raising=False)
    assert cli.main(["evaluate", str(bake_copy), "--tasks", "sentiment,code", "--limit",
                     "2"]) == 2
    captured = capsys.readouterr()
    assert "PROMPTBAKE_SANDBOX=audit-hook" in captured.err and "sentiment" not in captured.out


def test_non_finite_strengths_are_refused(bake_copy, capsys):
    assert cli.main(["kl", str(bake_copy), "--strength", "0,nan"]) == 2
    assert "strength=nan must be a finite number" in capsys.readouterr().err
    assert cli.main(["kl", str(bake_copy), "--strength", "0,abc"]) == 2
    assert "--strength 0,abc: 'abc' is not a number" in capsys.readouterr().err


def test_a_json_prompt_file_is_a_conversation(tiny_dir, tmp_path, capsys):
    demo = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    file = tmp_path / "demo.json"
    file.write_text(json.dumps(demo))
    out = tmp_path / "b"
    assert cli.main(["bake", "--prompt-file", str(file), "--model", str(tiny_dir), "--out",
                     str(out)] + TINY[:-3] + ["--steps", "1", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["prompt"]["messages"] == demo
    file.write_text('[{"role": "user"}]')
    assert cli.main(["bake", "--prompt-file", str(file), "--model", str(tiny_dir), "--out",
                     str(tmp_path / "c")]) == 2
    assert "prompt message 0" in capsys.readouterr().err


def test_contexts_generate_writes_a_file_bake_reads(tmp_path, capsys, monkeypatch, tiny_dir):
    from promptbake import contexts, generated

    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))

    def fake(model, tokenizer, prompt, n, say=None, **settings):
        texts = [f"How would a sailor tie knot number {i}?" for i in range(n - 1)]
        return generated.Generated([[{"role": "user", "content": t}] for t in texts],
                                   ["domain"] * (n - 1), n + 3, {"short": 4}, {"short": ["Hi"]},
                                   settings)

    monkeypatch.setattr(generated, "generate", fake)
    out = tmp_path / "made.jsonl"
    args = ["contexts", "generate", "--prompt", "You are a sailor.", "--n", "12", "--out",
            str(out), "--model", str(tiny_dir), "--kinds", "domain"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "11 contexts (11 domain) from 15 written; dropped: 4 fewer than 3 words" in printed
    assert "only 11 of 12 asked for were usable" in printed and "dropped as fewer" in printed
    assert len(contexts.load(out)) == 11
    assert cli.main(args) == 2  # the file exists: not replaced without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite", "--kinds", "nonsense"]) == 2
    assert "unknown context kinds ['nonsense']" in capsys.readouterr().err
    missing = ["contexts", "generate", "--prompt", "u", "--out", str(tmp_path / "o.jsonl"),
               "--generator", str(tmp_path / "no-such-model")]
    assert cli.main(missing) == 2
    assert "generator model" in capsys.readouterr().err


def test_evaluate_scores_tool_use_as_a_task(bake_copy, capsys):
    assert cli.main(["tasks"]) == 0
    assert "tool_use" in capsys.readouterr().out
    assert cli.main(["evaluate", str(bake_copy), "--tasks", "tool_use", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "tool_use" in printed and "forgetting gate" in printed


@pytest.mark.parametrize("retention, warned", [(0.95, False), (0.21, True), (-1.25, True)])
def test_an_export_that_loses_the_bake_says_so(capsys, retention, warned):
    from promptbake.cli import export

    kl = {"onnx": {"per_token": 0.2}, "baked": {"per_token": 0.03},
          "base": {"per_token": 0.31}, "retention": retention}
    export._print_retention({"held_out_kl": kl}, "onnx")
    out = capsys.readouterr().out
    assert f"keeps {100 * retention:.1f}% of the bake's KL reduction" in out
    assert ("warning" in out) == warned
    if warned:
        assert f"keeps only {100 * retention:.0f}% of the bake" in out
