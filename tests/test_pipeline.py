"""The pipeline file: parsing and its errors, the plan, and a run on the tiny model that a rerun
skips stage by stage."""

import json
import shutil
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from promptbake import models, pipeline
from promptbake.cli import main
from promptbake.orchestrate.tools import TOOL_DEFAULTS, TOOL_FIRST_TOKEN_WEIGHT
from promptbake.pipeline import PipelineError

MINIMAL = """
out = "runs/x"
[[cycles]]
name = "pirate"
persona = "pirate"
"""


def write(tmp_path, text, name="pipeline.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_example_parses_and_plans(tmp_path, capsys):
    assert main(["run", "--example"]) == 0
    text = capsys.readouterr().out
    loaded = pipeline.load(write(tmp_path, text))
    assert [c["name"] for c in loaded.cycles] == ["tools", "pirate"]
    assert loaded.model is None and loaded.out == tmp_path / "runs" / "engine-example"
    assert loaded.engine.max_rounds == 6 and loaded.bake.epochs == 4.0
    assert [s["action"] for s in pipeline.plan(loaded)] == ["run", "run", "run"]
    assert main(["run", str(tmp_path / "pipeline.toml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "engine: run" in printed and "cycle tools: tools shipped:CALC" in printed
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("text, message", [
    ("colour = 1\n" + MINIMAL, "unknown key 'colour' in the top level"),
    (MINIMAL.replace('out = "runs/x"', 'out = "runs/x"\n[engine]\nmax_round = 3'),
     r"unknown key 'max_round' in \[engine\]"),
    (MINIMAL.replace('out = "runs/x"', 'out = "runs/x"\n[bake]\nepochs = "four"'),
     r"\[bake\] epochs = 'four' must be a number"),
    (MINIMAL.replace('out = "runs/x"', 'out = "runs/x"\n[engine]\npatience = 0'),
     r"\[engine\]: engine: patience=0 \(at least 1\)"),
    (MINIMAL + "dev = 3\nflavour = 2\n", "unknown key 'flavour' in \\[\\[cycles\\]\\] number 1"),
    (MINIMAL + 'task = "arithmetic"\n', "exactly one of tools, persona or task"),
    ('out = "x"\n[[cycles]]\nname = "t"\ntask = "arithmetic"\n', "task but no prompt"),
    (MINIMAL + 'prompt_file = "missing.txt"\n', "prompt_file file missing.txt not found"),
    (MINIMAL + "dev = 0\n", "dev = 0 must be a whole number"),
    # checked when the file is read (and by --dry-run), not after the model has loaded
    (MINIMAL.replace('persona = "pirate"', 'persona = "pirat"'),
     "cycle 'pirate': persona = 'pirat': cannot read the persona file pirat"),
    (MINIMAL + "held_out = 5000\n", "cycle 'pirate' asks for 5024 dev and held-out items"),
    ('out = "x"\n[[cycles]]\nname = "t"\ntools = "shipped:CALK"\n',
     "cycle 't': tools = 'shipped:CALK': no shipped tool named CALK"),
    (MINIMAL.replace('out = "runs/x"', 'out = "runs/x"\n[engine]\nproposer = 5'),
     r"\[engine\] proposer = 5 must be a text"),
    (MINIMAL.replace('name = "pirate"', 'name = "a pirate"'), "cycle name 'a pirate'"),
    (MINIMAL + '[[cycles]]\nname = "pirate"\npersona = "pirate"\n', "cycle names repeat"),
    ('out = "x"\n', r"no \[\[cycles\]\]"),
    ("[[cycles]]\nname = 'a'\npersona = 'pirate'\n", "out .* is missing"),
    (MINIMAL + '[export]\nformat = "tflite"\n', r"\[export\] format='tflite': choose one of"),
    (MINIMAL + '[export]\nformat = "gguf"\nquantize = "int8"\n',
     r"\[export\] --quantize int8 does not apply to --format gguf"),
    (MINIMAL + '[export]\nformat = "onnx"\ngguf_lora = "adapter"\n',
     r"\[export\] --gguf-lora applies to --format gguf"),
    (MINIMAL + '[export]\nformat = "gguf"\ngguf_lora = "beside"\n',
     r"\[export\] gguf_lora='beside': choose one of merge, adapter"),
    ('model = "no/such/dir"\n' + MINIMAL, "model no/such/dir is not a directory"),
    (MINIMAL + 'metric = "end_to_end"\n', "metric = 'end_to_end': a tools cycle may choose"),
    ('out = "x"\n[[cycles]]\nname = "t"\ntools = "shipped:CALC"\nmetric = "accuracy"\n',
     "metric = 'accuracy'.*one of tool_use, call, end_to_end"),
    ("out = [\n", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(PipelineError, match=message):
        pipeline.load(write(tmp_path, text))


def test_a_tools_cycle_is_scored_by_its_metric(tiny_dir, tmp_path, capsys, monkeypatch):
    text = ('out = "x"\n[[cycles]]\nname = "t"\ntools = "shipped:CALC,CONVERT"\ndev = 2\n'
            'held_out = 2\n')
    default = pipeline.load(write(tmp_path, text))
    chosen = pipeline.load(write(tmp_path, text + 'metric = "end_to_end"\n', "chosen.toml"))
    assert chosen.keys()["engine"] != default.keys()["engine"]
    assert main(["run", str(tmp_path / "chosen.toml"), "--dry-run"]) == 0
    assert "dev 2, held-out 2, scored by end_to_end" in capsys.readouterr().out
    monkeypatch.setattr(pipeline, "bake_contexts", lambda *a, **k: (None, None))
    lm, tokenizer, _ = models.load(tiny_dir)
    (cycle,) = pipeline.build_cycles(chosen, lm, tokenizer, lambda _: None)
    assert cycle.dev.metric == cycle.held_out.metric == "end_to_end"
    (cycle,) = pipeline.build_cycles(default, lm, tokenizer, lambda _: None)
    assert cycle.dev.metric == "tool_use"


def test_tool_conversations_are_kept_for_a_rerun(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"user": "What is 12 * 3?", "tool": "CALC"}, {"user": "Say hi.", "tool": None}]))
    text = ('out = "x"\n[bake]\nmax_new_tokens = 6\n[[cycles]]\nname = "t"\n'
            'tools = "shipped:CALC,CONVERT"\ncontexts = "questions.jsonl"\ndev = 2\n'
            'held_out = 2\n')
    lm, tokenizer, _ = models.load(tiny_dir)
    cache = tmp_path / "cache"
    (made,) = pipeline.build_cycles(pipeline.load(write(tmp_path, text)), lm, tokenizer,
                                    lambda _: None, cache=cache, model_dir=tiny_dir)
    (kept,) = cache.iterdir()
    assert kept.name.startswith("t-") and json.loads(kept.read_text()) == made.contexts
    said = []
    with monkeypatch.context() as patch:  # read back, not written again
        patch.setattr(pipeline, "bake_contexts", lambda *a, **k: pytest.fail("written again"))
        (again,) = pipeline.build_cycles(pipeline.load(write(tmp_path, text)), lm, tokenizer,
                                         said.append, cache=cache, model_dir=tiny_dir)
    assert again.contexts == made.contexts and str(kept) in said[0]
    # another token budget writes them again, in place of the old file
    pipeline.build_cycles(pipeline.load(write(tmp_path, text.replace("= 6", "= 5"))), lm,
                          tokenizer, lambda _: None, cache=cache, model_dir=tiny_dir)
    (other,) = cache.iterdir()
    assert other.name != kept.name


def test_demonstrations_file_is_checked(tmp_path):
    (tmp_path / "demos.json").write_text('[[{"role": "assistant", "content": "hi"}]]')
    with pytest.raises(PipelineError, match="demonstration 0 is not a list of chat messages"):
        pipeline.load(write(tmp_path, MINIMAL + 'demonstrations = "demos.json"\n'))
    (tmp_path / "demos.json").write_text('[[{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "Arr."}]]')
    assert pipeline.load(write(tmp_path, MINIMAL + 'demonstrations = "demos.json"\n'))


def test_a_missing_file_and_the_cli_exit(tmp_path, capsys):
    with pytest.raises(PipelineError, match="not found"):
        pipeline.load(tmp_path / "none.toml")
    assert main(["run", str(write(tmp_path, MINIMAL + "colour = 1\n"))]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err


def test_an_export_with_nothing_to_export_removes_the_earlier_one(tmp_path):
    loaded = pipeline.load(write(tmp_path, MINIMAL + "[export]\n"))
    earlier = loaded.out / "export" / "model"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_text("an earlier run's")
    (loaded.out / "engine").mkdir()  # a run whose rounds all lost: no final state
    said = []
    assert pipeline._export(loaded, loaded.out / "engine", loaded.out / "export",
                            said.append) == {"exported": None}
    assert not earlier.exists() and "nothing to export" in said[0]


def test_a_run_on_the_tiny_model_and_its_rerun(tiny_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"user": "What is 12 * 3?", "tool": "CALC"}, {"user": "Say hi.", "tool": None},
        {"user": "Convert 2 km to m.", "tool": "CONVERT"}]))
    text = f"""
model = "{tiny_dir}"
out = "out"
[bake]
train_contexts = 3
eval_contexts = 2
probe_contexts = 0
samples_per_context = 1
max_new_tokens = 6
steps = 1
[engine]
max_rounds = 2
proposals = 0
edits = 1
patience = 3
[[cycles]]
name = "tools"
tools = "shipped:CALC,CONVERT"
contexts = "questions.jsonl"
dev = 2
held_out = 2
[[cycles]]
name = "sense"
task = "commonsense"
prompt = "Pick the sensible answer. Think about everyday life."
dev = 3
held_out = 3
[report]
[export]
format = "safetensors"
"""
    path = write(tmp_path, text)
    out = tmp_path / "out"
    # killed while building the cycles, before the engine wrote anything: the rerun starts it
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "build_cycles", lambda *a, **k: (_ for _ in ()).throw(
            KeyboardInterrupt()))
        assert main(["run", str(path)]) == 130
    assert json.loads((out / "engine" / "stage.json").read_text())["status"] == "running"
    assert pipeline.plan(pipeline.load(path))[0]["action"] == "resume"
    assert main(["run", str(path)]) == 0
    stages = {s: json.loads((out / s / "stage.json").read_text()) for s in pipeline.STAGES}
    assert all(s["status"] == "done" for s in stages.values())
    history = json.loads((out / "engine" / "engine.json").read_text())
    # two rounds: the second goes to the cycle that has had none
    assert [r["cycle"] for r in history["rounds"]] == ["tools", "sense"]
    assert set(history["references"]) == {"tools", "sense"}
    assert (out / "report" / "engine-report.md").read_text().startswith("# Engine run")
    assert (out / "report" / "engine-report.png").stat().st_size > 0
    if history["result"]["best_round"]:
        model = AutoModelForCausalLM.from_pretrained(out / "export" / "model")
        assert model.config.num_hidden_layers == 2
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                  out / "engine" / "final")
    else:
        assert stages["export"]["exported"] is None
    capsys.readouterr()
    # unchanged: every stage is skipped; a changed export setting reruns the export alone
    assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["skip"] * 3
    # a release with other tool-bake defaults starts the engine afresh (its rounds were baked
    # with the old ones), unless [bake] sets that field (this file sets train_contexts)
    with monkeypatch.context() as patch:
        patch.setitem(TOOL_DEFAULTS, "train_contexts", TOOL_DEFAULTS["train_contexts"] + 1)
        assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["skip"] * 3
        patch.setitem(TOOL_DEFAULTS, "epochs", TOOL_DEFAULTS["epochs"] * 2)
        assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["run"] * 3
    write(tmp_path, text.replace('format = "safetensors"',
                                 'format = "safetensors"\nstrength = 0.5'))
    assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["skip", "skip", "run"]
    # more rounds continue the engine; a changed engine setting starts it afresh
    write(tmp_path, text.replace("max_rounds = 2", "max_rounds = 3"))
    assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["resume", "run", "run"]
    write(tmp_path, text.replace("max_rounds = 2", "max_rounds = 2\nsurvive = 0.9"))
    assert [s["action"] for s in pipeline.plan(pipeline.load(path))] == ["run"] * 3
    # killed before the new engine started: the old run stays until the engine, on the rerun,
    # finds it was made with other settings and replaces it (a run it can resume, it resumes)
    old_identity = json.loads((out / "engine" / "engine.json").read_text())["identity"]
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "build_cycles", lambda *a, **k: (_ for _ in ()).throw(
            KeyboardInterrupt()))
        assert main(["run", str(path)]) == 130
    assert (out / "engine" / "engine.json").exists()
    assert main(["run", str(path), "--quiet"]) == 0
    assert json.loads((out / "engine" / "stage.json").read_text())["status"] == "done"
    replaced = json.loads((out / "engine" / "engine.json").read_text())
    assert replaced["identity"] != old_identity and replaced["settings"]["survive"] == 0.9
    # report on the engine directory, through the CLI: exit 1 when a gate fails
    status = main(["report", str(out / "engine")])
    gates = json.loads((out / "engine" / "engine-report.json").read_text())["gates"]
    assert status == (0 if all(g["passed"] for g in gates) else 1)
    assert "tools: kept model without a prompt" in capsys.readouterr().out
    # a tool cycle bakes with a tool bake's defaults, except the fields [bake] sets (this
    # file sets train_contexts and samples_per_context)
    assert {"train_contexts", "samples_per_context"} < set(TOOL_DEFAULTS)
    lm, tokenizer, _ = models.load(tiny_dir)
    built = pipeline.build_cycles(pipeline.load(path), lm, tokenizer, lambda _: None)
    assert [c.bake for c in built] == [{"first_token_weight": TOOL_FIRST_TOKEN_WEIGHT,
                                        "epochs": TOOL_DEFAULTS["epochs"]}, {}]
    write(tmp_path, text.replace("steps = 1", "steps = 1\nfirst_token_weight = 2.0")
          .replace("train_contexts = 3\n", ""))
    built = pipeline.build_cycles(pipeline.load(path), lm, tokenizer, lambda _: None)
    assert [c.bake for c in built] == [{"train_contexts": TOOL_DEFAULTS["train_contexts"],
                                        "epochs": TOOL_DEFAULTS["epochs"]}, {}]


def test_a_model_path_is_keyed_by_its_weights_not_by_how_it_was_typed(tiny_dir, tmp_path,
                                                                     monkeypatch):
    (tmp_path / "proj").mkdir()
    shutil.copytree(tiny_dir, tmp_path / "proj" / "model")
    path = write(tmp_path / "proj", 'model = "model"\n' + MINIMAL +
                 '[engine]\nproposer = "model"\n')
    absolute = pipeline.load(path)
    monkeypatch.chdir(tmp_path)
    relative = pipeline.load(Path("proj") / path.name)
    assert relative.model == absolute.model == str((tmp_path / "proj" / "model").absolute())
    keys = absolute.keys()
    assert relative.keys() == keys
    weights = next((tmp_path / "proj" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")  # replaced in place: not up to date
    assert pipeline.load(path).keys()["engine"] != keys["engine"]
    # a relative proposer is read beside the pipeline file too, not from the working directory
    assert Path(relative.engine.proposer).resolve() == (tmp_path / "proj" / "model").resolve()
    # first_token_weight (None by default, a float when set) takes a whole number
    text = 'model = "model"\n' + MINIMAL + "[bake]\nfirst_token_weight = 2\n"
    assert pipeline.load(write(tmp_path / "proj", text)).bake.first_token_weight == 2.0
