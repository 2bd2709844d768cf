"""promptbake report on the tiny model: every section, the gates, files listed for --overwrite."""

import json

import pytest

from promptbake import BakeConfig, bake, cli
from promptbake.report import report


@pytest.fixture(scope="module")
def baked_dir(tiny_dir, tmp_path_factory, prompt):
    out = tmp_path_factory.mktemp("report") / "pirate"
    config = BakeConfig(train_contexts=4, eval_contexts=3, samples_per_context=2,
                        max_new_tokens=8, sample_batch=8, batch_size=4, steps=4, lr=2e-2,
                        warmup=0.0, snapshot_every=2)
    bake(prompt, model=tiny_dir, config=config, out=out)
    return out


@pytest.fixture()
def small_task(tmp_path):
    path = tmp_path / "colours.jsonl"
    items = [{"id": f"c{i}", "prompt": f"What colour is thing {i}?",
              "choices": ["Red", "Blue", "Green"], "answer": i % 3} for i in range(6)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_report_writes_every_section(baked_dir, small_task):
    record = report(baked_dir, tasks=[str(small_task)], limit=None, turns=2, conversations=2,
                    strengths=(0, 1), drift_tokens=6)
    targets = [g["target"] for g in record["gates"]]
    assert targets[0].startswith("held-out KL reduction")
    assert any(t.startswith("forgetting") for t in targets)
    assert any(t.startswith("persona drift") for t in targets)  # the pirate, recognised
    assert record["drift"]["persona"] == "pirate"
    assert set(record["strength"]["points"]) == {"0", "1"}
    assert set(record["snapshots"]) == {"2", "4"}
    cells = record["reprompt"]["colours"]["cells"]
    assert set(cells) == {"base", "prompted", "baked", "baked+prompt"} and cells["base"]["n"] == 6
    # The second forgetting gate compares the baked cell with the prompted one; a task is damage
    # only when it fails against both; the gate's command reproduces this report.
    second = next(g for g in record["gates"] if g["target"].startswith("forgetting beyond"))
    assert second["command"].startswith(f"promptbake report {baked_dir}")
    assert "--tasks" in second["command"] and "--limit 0" in second["command"]
    vs_prompted = record["forgetting_vs_prompted"]
    beyond = vs_prompted["tasks"]["colours"]
    assert beyond["base"]["value"] == cells["prompted"]["value"]
    assert beyond["baked"]["value"] == cells["baked"]["value"]
    both = beyond["failed"] and record["forgetting"]["tasks"]["colours"]["failed"]
    assert vs_prompted["damaged"] == (["colours"] if both else [])
    assert second["passed"] == (not both)
    for name in ("report.md", "report.json", "report-strength.png", "report-snapshots.png",
                 "report-forgetting.png", "report-drift.png"):
        assert (baked_dir / name).is_file(), name
    text = (baked_dir / "report.md").read_text()
    assert "## Gates" in text and "| target | measured | result | reproduce |" in text
    assert "promptbake evaluate" in text
    marker = json.loads((baked_dir / ".promptbake.json").read_text())
    assert "report.md" in marker["files"]  # --overwrite removes it with the bake


def test_report_cli_exit_code_follows_the_gates(baked_dir, capsys):
    code = cli.main(["report", str(baked_dir), "--tasks", "none", "--persona", "none",
                     "--strength", "1"])
    out = capsys.readouterr().out
    record = json.loads((baked_dir / "report.json").read_text())
    assert code == (0 if all(g["passed"] for g in record["gates"]) else 1)
    assert "held-out KL reduction" in out and len(record["gates"]) == 2
    assert record["gates"][1]["target"].startswith("off-distribution KL reduction not far below")
    off = record["kl_off_distribution"]
    assert off["contexts"] == 24 and len(off["kinds"]) == 8
    assert "## Off-distribution KL (probe set" in (baked_dir / "report.md").read_text()


def test_off_distribution_gate_flags_a_bake_that_holds_only_where_it_trained():
    from promptbake.report import off_distribution_gate

    held = {"reduction": 0.92, "reduction_se": 0.01}
    assert off_distribution_gate(held, {"reduction": 0.88, "reduction_se": 0.02}, "c").passed
    assert not off_distribution_gate(held, {"reduction": 0.60, "reduction_se": 0.03}, "c").passed
    # 30 points lower, but so uncertain that the difference is within two errors: not flagged
    assert off_distribution_gate(held, {"reduction": 0.62, "reduction_se": 0.2}, "c").passed


def test_report_derives_an_adherence_scorer_for_any_prompt(plain_bake, tmp_path, monkeypatch,
                                                           derived_answers, tokenizer):
    import shutil

    from promptbake import persona as persona_mod

    copy = tmp_path / "bake"
    shutil.copytree(plain_bake, copy)
    record = report(copy, tasks=[], turns=2, conversations=2, strengths=(1,), drift_tokens=4)
    assert record["drift"]["scorer"] == "derived from the prompt, 16 exemplar pairs"
    gate = next(g for g in record["gates"] if g["target"].startswith("persona drift"))
    assert gate["command"] == f"promptbake report {copy} --turns 2 --conversations 2"
    assert "## Persona drift (derived from the prompt, 16 exemplar pairs)" in \
        (copy / "report.md").read_text()
    assert not (copy / "personas").exists()
    # A prompt that changes no answer: the report says why drift was skipped and measures the rest.
    monkeypatch.setattr(persona_mod, "greedy", lambda model, prefixes, **options: [
        tokenizer.encode("Same.", add_special_tokens=False)] * len(prefixes))
    record = report(copy, tasks=[], turns=2, conversations=2, strengths=(1,), drift_tokens=3)
    assert "drift" not in record and "changes too little" in record["drift_skipped"]
    assert not any(g["target"].startswith("persona drift") for g in record["gates"])


def test_a_bake_from_before_the_probe_set_is_measured_off_distribution(bake_copy):
    manifest_path = bake_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("kl_off_distribution")
    manifest["config"].pop("probe_contexts")
    manifest_path.write_text(json.dumps(manifest))
    (bake_copy / "probe_trajectories.safetensors").unlink()
    record = report(bake_copy, tasks=[], persona="", strengths=(1,))
    off = record["kl_off_distribution"]
    assert off["contexts"] == 24 and off["before"]["sequences"] == 24
    assert any(g["target"].startswith("off-distribution") for g in record["gates"])


def test_candidate_sources_count_each_kind_against_its_rounds_incumbent():
    from promptbake.report import candidate_sources

    def dev(value):
        return {"dev": {"value": value, "se": 0.1}}

    rounds = [{"candidates": [{"source": "incumbent", **dev(0.5)},
                              {"source": "edit: drop demonstration 2", **dev(0.25)},
                              {"source": "proposed: rewrite", **dev(0.75)}],
               "winner": {"index": 2}},
              {"candidates": [{"source": "incumbent", **dev(0.25)},
                              {"source": "edit: drop demonstration 1", **dev(0.5)},
                              {"source": "proposed: rewrite", **dev(0.0)}],
               "winner": {"index": 0}},
              {"failed": "an evaluator raised"}]  # no candidates: not counted
    found = {s["source"]: s for s in candidate_sources(rounds)}
    assert list(found) == ["incumbent", "edit: drop demonstration", "proposed: rewrite"]
    assert found["incumbent"] == {"source": "incumbent", "candidates": 2, "above": 0, "won": 1,
                                  "mean_difference": None, "se": None}
    drop, rewrite = found["edit: drop demonstration"], found["proposed: rewrite"]
    assert (drop["candidates"], drop["above"], drop["won"]) == (2, 1, 0)
    assert drop["mean_difference"] == pytest.approx(0.0)  # -0.25 and +0.25
    assert drop["se"] == pytest.approx(0.25)  # sd 0.354 over sqrt(2)
    assert (rewrite["above"], rewrite["won"]) == (1, 1)
    assert rewrite["mean_difference"] == pytest.approx(0.0)  # +0.25 and -0.25
