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
    assert "held-out KL reduction" in out and len(record["gates"]) == 1
