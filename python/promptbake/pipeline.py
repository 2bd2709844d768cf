"""One pipeline file: ``promptbake run pipeline.toml``.

The file (standard-library TOML) declares the model, the engine's cycles, the bake and engine
settings, and the stages after the engine::

    model = "default"            # or a transformers model directory
    out = "runs/example"         # every stage writes a directory under it

    [bake]                       # BakeConfig fields (promptbake bake --help)
    epochs = 4.0
    [engine]                     # EngineConfig fields (promptbake.engine)
    max_rounds = 6

    [[cycles]]
    name = "tools"
    tools = "shipped:CALC,CONVERT,DAYS_BETWEEN,WEEKDAY"  # or a ToolSpec JSON file
    dev = 24                     # items to choose prompts on; the next held_out judge the model
    held_out = 48
    metric = "tool_use"          # what the cycle is scored by (tools.METRICS)

    [[cycles]]
    name = "pirate"
    persona = "pirate"           # a built-in persona or a persona JSON file

    [report]                     # the engine's history, table and plot
    [export]
    format = "safetensors"       # or "onnx" (quantize = "int8")

A cycle's evaluator comes from ``tools`` (tool use), ``persona`` (adherence) or ``task`` (a
shipped task or a .jsonl file, with ``prompt`` or ``prompt_file``); ``prompt``/``prompt_file``
also override a rendered tool prompt or a persona's. Relative paths are read from the pipeline
file's directory. Each stage (engine, report, export) writes ``OUT/<stage>/`` with a
``stage.json`` holding the hash of its settings and inputs; a rerun skips the stages whose hash
is unchanged and finished, runs again those whose hash changed (the engine keeps a run made
with the same cycles, settings and model, and replaces any other), and the engine resumes after
its last finished round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import tomllib
from pathlib import Path
from typing import Callable

from promptbake import contexts as contexts_mod, files, models, tools
from promptbake.config import BakeConfig
from promptbake.engine import (Cycle, EngineConfig, check_name, outcome_settings,
                               resume_settings, run_engine)
from promptbake.framing import prompt_messages, read_prompt_file
from promptbake.orchestrate.tools import TOOL_DEFAULTS, bake_contexts, tool_specs
from promptbake.persona import AdherenceEvaluator, Persona
from promptbake.tasks import load_task
from promptbake.versions import promptbake_version

TOP = ("model", "out", "bake", "engine", "cycles", "report", "export")
CYCLE = ("name", "tools", "persona", "task", "prompt", "prompt_file", "dev", "held_out",
         "contexts", "demonstrations", "metric")
REPORT = ()
EXPORT = ("format", "quantize", "strength", "gguf_lora")
STAGES = ("engine", "report", "export")
STAGE_FILE = "stage.json"
TOOL_CONTEXTS = "tool-contexts"  # in the engine stage's directory: see build_cycles


class PipelineError(ValueError):
    """A pipeline file that cannot run; the message names the file, the table and the key."""


@dataclasses.dataclass
class Pipeline:
    """A parsed pipeline file."""

    path: Path
    model: str | None
    out: Path
    bake: BakeConfig
    engine: EngineConfig
    cycles: list[dict]
    report: dict | None
    export: dict | None
    bake_given: frozenset = frozenset()  # the [bake] keys the file sets

    def file(self, value) -> Path:
        """A path of the file, relative to the pipeline file's directory."""
        return _beside(self.path, value)

    def stages(self) -> list[str]:
        return ["engine"] + [s for s in ("report", "export") if getattr(self, s) is not None]

    def cycle_bake(self, cycle: dict) -> dict:
        """What a cycle's bakes change from ``[bake]``: a tool cycle bakes with a tool bake's
        defaults (``TOOL_DEFAULTS``), except where ``[bake]`` sets a field. Part of the engine
        stage's hash, so a new release's tool defaults start the stage afresh."""
        return {k: v for k, v in TOOL_DEFAULTS.items() if k not in self.bake_given} \
            if "tools" in cycle else {}

    def keys(self) -> dict[str, str]:
        """Each stage's hash: its settings, the contents of the files it reads, and the hash of
        the stage before it."""
        read = {}
        for cycle in self.cycles:
            for key in ("tools", "persona", "task", "prompt_file", "contexts", "demonstrations"):
                if key in cycle and self.file(cycle[key]).is_file():
                    read[f"{cycle['name']}.{key}"] = _sha(self.file(cycle[key]).read_bytes())
        # a model directory by its weights, not by the path typed (which depends on where the
        # pipeline was started from); without max_rounds: more rounds continue a run (plan)
        model = None if self.model is None else models.fingerprint(Path(self.model))
        engine = _sha(files.to_json({
            "model": model, "bake": outcome_settings(self.bake),
            "engine": resume_settings(self.engine), "cycles": self.cycles, "files": read,
            "cycle_bake": {c["name"]: self.cycle_bake(c) for c in self.cycles}},
            sort_keys=True).encode())
        out = {"engine": engine}
        for stage in ("report", "export"):
            settings = getattr(self, stage)
            if settings is not None:
                out[stage] = _sha(files.to_json({"after": engine, stage: settings},
                                                sort_keys=True).encode())
        return out


def _beside(pipeline_file: Path, value) -> Path:
    """``value`` as an absolute path, a relative one read from the pipeline file's directory
    (so that what is recorded does not depend on where the pipeline was started from)."""
    return (pipeline_file.parent / Path(value).expanduser()).absolute()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(path: str | Path) -> Pipeline:
    """Reads and checks a pipeline file; every error names the table and key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PipelineError(f"pipeline file not found: {path}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not valid TOML: {err}") from err
    _known(path, "the top level", data, TOP)
    if not data.get("cycles"):
        raise PipelineError(f"{path}: no [[cycles]]: declare at least one cycle (a tool set, a "
                            f"persona or a prompt with a task)")
    bake = _settings(path, "bake", data.get("bake", {}), BakeConfig)
    engine_table = data.get("engine", {})
    if isinstance(engine_table, dict) and isinstance(engine_table.get("proposer"), str):
        engine_table = {**engine_table, "proposer": str(_beside(path, engine_table["proposer"]))}
    engine = _settings(path, "engine", engine_table, EngineConfig)
    model = data.get("model", "default")
    if not isinstance(model, str):
        raise PipelineError(f"{path}: model must be a text (\"default\" or a model directory)")
    if "out" not in data or not isinstance(data["out"], str):
        raise PipelineError(f"{path}: out (the directory the stages write under) is missing or "
                            f"not a text")
    pipeline = Pipeline(path, None if model == "default" else model, Path(), bake, engine, [],
                        _table(path, "report", data.get("report"), REPORT),
                        _table(path, "export", data.get("export"), EXPORT),
                        frozenset(data.get("bake", {})))
    pipeline.out = pipeline.file(data["out"])
    if pipeline.model is not None:
        pipeline.model = str(pipeline.file(pipeline.model))
        if not Path(pipeline.model).is_dir():
            raise PipelineError(f"{path}: model {data['model']} is not a directory: give a "
                                f"transformers model directory or \"default\"")
    names = []
    for i, cycle in enumerate(data["cycles"]):
        where = f"[[cycles]] number {i + 1}"
        if not isinstance(cycle, dict):
            raise PipelineError(f"{path}: {where} is not a table")
        _known(path, where, cycle, CYCLE)
        pipeline.cycles.append(_cycle(pipeline, where, cycle))
        names.append(cycle["name"])
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: cycle names repeat ({', '.join(names)}): give each its own")
    if pipeline.export is not None:
        from promptbake.export import check_gguf_lora, check_quantize

        fmt = pipeline.export.setdefault("format", "safetensors")
        try:
            check_quantize(fmt, pipeline.export.get("quantize"))
            check_gguf_lora(fmt, pipeline.export.get("quantize"), pipeline.export.get("gguf_lora"))
        except ValueError as err:
            raise PipelineError(f"{path}: [export] {err}") from err
    return pipeline


def _known(path: Path, where: str, table: dict, known: tuple) -> None:
    unknown = [k for k in table if k not in known]
    if unknown:
        raise PipelineError(f"{path}: unknown key {unknown[0]!r} in {where} (known keys: "
                            f"{', '.join(known) or 'none'})")


def _table(path: Path, name: str, value, known: tuple) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: {name} must be a table ([{name}])")
    _known(path, f"[{name}]", value, known)
    return dict(value)


def _settings(path: Path, name: str, table, kind):
    """A ``kind`` dataclass from a table: unknown keys and wrong types named."""
    if not isinstance(table, dict):
        raise PipelineError(f"{path}: {name} must be a table ([{name}])")
    default = kind()
    fields = {f.name for f in dataclasses.fields(kind)}
    _known(path, f"[{name}]", table, tuple(sorted(fields)))
    table = dict(table)
    annotations = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    for key, value in table.items():
        expected = getattr(default, key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if whole and (isinstance(expected, float) or expected is None and
                      "float" in annotations[key] and "int" not in annotations[key]):
            table[key] = value = float(value)  # epochs = 4 is epochs = 4.0
        # a field that defaults to None takes what its annotation names ("int | None", ...)
        allowed = [type(expected)] if expected is not None else \
            [t for t in _KINDS if t.__name__ in annotations[key]]
        if type(value) not in allowed:
            kinds = " or ".join(_KINDS[t] for t in allowed)
            raise PipelineError(f"{path}: [{name}] {key} = {value!r} must be a {kinds}")
    try:
        made = kind(**table)
        made.validate()
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path}: [{name}]: {err}") from err
    return made


_KINDS = {bool: "true or false", int: "whole number", float: "number", str: "text",
          list: "list"}


def _cycle(pipeline: Pipeline, where: str, cycle: dict) -> dict:
    path = pipeline.path
    try:
        check_name(cycle.get("name"))
    except ValueError as err:
        raise PipelineError(f"{path}: {where}: {err}") from err
    where = f"cycle {cycle['name']!r}"
    sources = [k for k in ("tools", "persona", "task") if k in cycle]
    if len(sources) != 1:
        raise PipelineError(f"{path}: {where} needs exactly one of tools, persona or task (the "
                            f"evaluator), not {', '.join(sources) or 'none'}")
    if "task" in cycle and not ("prompt" in cycle or "prompt_file" in cycle):
        raise PipelineError(f"{path}: {where} has a task but no prompt or prompt_file")
    if "prompt" in cycle and "prompt_file" in cycle:
        raise PipelineError(f"{path}: {where} has both prompt and prompt_file: keep one")
    if "metric" in cycle and ("tools" not in cycle or cycle["metric"] not in tools.METRICS):
        raise PipelineError(f"{path}: {where}: metric = {cycle['metric']!r}: a tools cycle may "
                            f"choose what it is scored by, one of {', '.join(tools.METRICS)} "
                            f"(a persona cycle scores adherence, a task cycle its task's metric)")
    for key in ("dev", "held_out"):
        if key in cycle and (not isinstance(cycle[key], int) or cycle[key] < 1):
            raise PipelineError(f"{path}: {where}: {key} = {cycle[key]!r} must be a whole "
                                f"number >= 1")
    for key in ("prompt_file", "contexts", "demonstrations"):
        if key in cycle and not pipeline.file(cycle[key]).is_file():
            raise PipelineError(f"{path}: {where}: {key} file {cycle[key]} not found")
    if "demonstrations" in cycle:
        _check_demonstrations(pipeline.file(cycle["demonstrations"]), f"{path}: {where}")
    for key in ("tools", "persona", "task"):  # a file or a shipped name
        value = cycle.get(key)
        if value is not None and not isinstance(value, str):
            raise PipelineError(f"{path}: {where}: {key} must be a text")
    _source(pipeline, cycle)  # loads, with enough items: now, not after the model has loaded
    return dict(cycle)


def _check_demonstrations(file: Path, where: str) -> None:
    """A demonstrations file: a JSON list of demonstrations, each a list of chat messages that
    starts with the user's."""
    try:
        demos = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(demos, list) or not demos:
            raise ValueError("not a non-empty JSON list")
        for k, demo in enumerate(demos):
            if not isinstance(demo, list) or not demo or prompt_messages(demo)[0]["role"] != "user":
                raise ValueError(f"demonstration {k} is not a list of chat messages starting "
                                 f"with a user message")
    except (OSError, ValueError) as err:
        raise PipelineError(f"{where}: demonstrations file {file}: {err}") from err


# -- building the cycles -----------------------------------------------------------------------


def _name_or_file(pipeline: Pipeline, value: str) -> str:
    """A shipped name as it is; anything that names an existing file, as its path."""
    path = pipeline.file(value)
    return str(path) if path.is_file() else value


def _source(pipeline: Pipeline, spec: dict) -> tuple[object, list]:
    """A cycle's evaluator source (its tool specs, Persona or Task) and the items its dev and
    held-out splits are cut from (a persona's: the shipped held-out contexts, from the end of
    the list, never trained on); an error names the cycle."""
    name, wanted = spec["name"], spec.get("dev", 24) + spec.get("held_out", 48)
    kind = next(k for k in ("tools", "persona", "task") if k in spec)
    try:
        if kind == "tools":
            specs = tool_specs(_name_or_file(pipeline, spec["tools"]))
            loaded, items = specs, tools.shipped.test_items(specs)
        elif kind == "persona":
            loaded = Persona.load(_name_or_file(pipeline, spec["persona"]))
            items = contexts_mod.builtin("held_out")[::-1]
        else:
            loaded = load_task(_name_or_file(pipeline, spec["task"]))
            items = loaded.items
    except (OSError, ValueError) as err:
        raise PipelineError(f"{pipeline.path}: cycle {name!r}: {kind} = {spec[kind]!r}: "
                            f"{err}") from err
    if len(items) < wanted:
        raise PipelineError(f"{pipeline.path}: cycle {name!r} asks for {wanted} dev and held-out "
                            f"items but its evaluator has {len(items)}: lower dev or held_out")
    return loaded, list(items)


def build_cycles(pipeline: Pipeline, lm, tokenizer, say: Callable[[str], None], *,
                 cache: Path | None = None, model_dir: Path | None = None) -> list[Cycle]:
    """The engine's cycles from the file; a tool cycle's training conversations are written by
    the model prompted with the tool prompt (``orchestrate.tools.bake_contexts``). With
    ``cache`` (a directory) and ``model_dir`` (the weights of ``lm``), they are kept there and
    read back by a rerun with the same model, prompt, tools, questions and settings: a resumed
    run bakes on the very contexts it started with (greedy decoding on other threads or library
    versions may write other ones) and does not spend minutes writing them again."""
    out = []
    for spec in pipeline.cycles:
        name, dev, held = spec["name"], spec.get("dev", 24), spec.get("held_out", 48)
        prompt = None
        if "prompt_file" in spec:
            prompt = read_prompt_file(pipeline.file(spec["prompt_file"]))
        elif "prompt" in spec:
            prompt = spec["prompt"]
        contexts = str(pipeline.file(spec["contexts"])) if "contexts" in spec else None
        demonstrations = json.loads(pipeline.file(spec["demonstrations"]).read_text("utf-8")) \
            if "demonstrations" in spec else []
        loaded, items = _source(pipeline, spec)
        if "tools" in spec:
            specs = loaded
            prompt = prompt or tools.render(specs, tokenizer)
            metric = spec.get("metric", "tool_use")
            dev_eval = tools.ToolUse(specs=specs, items=items[:dev], metric=metric)
            held_eval = tools.ToolUse(specs=specs, items=items[dev:dev + held], metric=metric)
            contexts = _tool_contexts(pipeline, name, lm, tokenizer, prompt, specs, contexts,
                                      cache, model_dir, say)
        elif "persona" in spec:
            persona = loaded
            prompt = prompt or persona.prompt
            dev_eval = AdherenceEvaluator(persona, items[:dev])
            held_eval = AdherenceEvaluator(persona, items[dev:dev + held])
        else:
            task = loaded
            dev_eval = dataclasses.replace(task, items=items[:dev])
            held_eval = dataclasses.replace(task, items=items[dev:dev + held])
        dev_eval.name, held_eval.name = f"{name}:dev", f"{name}:held-out"
        out.append(Cycle(name, prompt, dev_eval, held_eval, contexts=contexts,
                         demonstrations=demonstrations, bake=pipeline.cycle_bake(spec)))
    return out


def _tool_contexts(pipeline: Pipeline, name: str, lm, tokenizer, prompt, specs, contexts,
                   cache: Path | None, model_dir: Path | None, say) -> list:
    """A tool cycle's training contexts (``bake_contexts``), kept in ``cache`` (see
    ``build_cycles``) under a hash of everything that writes them."""
    settings = {"framing": pipeline.bake.framing, "max_new_tokens": pipeline.bake.max_new_tokens}
    path = None
    if cache is not None and model_dir is not None:
        questions = Path(contexts).read_text("utf-8") if contexts is not None else \
            files.to_json(tools.shipped.train_rows())
        key = _sha(files.to_json({
            "model": models.fingerprint(model_dir), "prompt": prompt, "questions": questions,
            "specs": [s.to_dict() for s in specs], "version": promptbake_version(),
            **settings}, sort_keys=True).encode())
        path = Path(cache) / f"{name}-{key[:16]}.json"
        if path.is_file():
            say(f"cycle {name}: the conversations with executed tool results from {path}")
            return json.loads(path.read_text(encoding="utf-8"))
    say(f"cycle {name}: conversations with executed tool results to bake on")
    made, _ = bake_contexts(lm, tokenizer, prompt, specs, tools.shipped.registry(), contexts,
                            **settings)
    if path is not None:
        for old in path.parent.glob(f"{name}-*.json"):  # another model's, prompt's, release's
            if len(old.name) == len(path.name):  # not another cycle's, named "{name}-..."
                files.remove(old)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, files.to_json(made))
    return made


# -- running -----------------------------------------------------------------------------------


def plan(pipeline: Pipeline) -> list[dict]:
    """Each stage: its directory, its hash, and whether it runs ("run", "resume") or is up to
    date ("skip")."""
    keys, out = pipeline.keys(), []
    for stage in pipeline.stages():
        directory = pipeline.out / stage
        found = _read_stage(directory) or {}
        same = found.get("key") == keys[stage]
        more_rounds = stage == "engine" and (found.get("stopped") == "error" or (
            found.get("stopped") == "round limit" and
            found.get("max_rounds", 0) < pipeline.engine.max_rounds))
        if same and found.get("status") == "done" and not more_rounds and \
                all(o["action"] == "skip" for o in out):
            action = "skip"
        elif same and stage == "engine":
            action = "resume"  # after its last finished round
        else:
            action = "run"
        out.append({"stage": stage, "directory": str(directory), "key": keys[stage],
                    "action": action})
    return out


def _read_stage(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mark(directory: Path, stage: str, key: str, status: str, **more) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files.write_text(directory / STAGE_FILE, files.to_json(
        {"stage": stage, "key": key, "status": status,
         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **more}, indent=2))


def run(pipeline: Pipeline, *, dry_run: bool = False, progress: bool = False,
        say: Callable[[str], None] = print) -> list[dict]:
    """Runs the stages the plan says to run (none with ``dry_run``; ``progress``: the bakes'
    progress bars); returns the plan."""
    steps = plan(pipeline)
    for step in steps:
        say(f"{step['stage']:>7}: {step['action']:<6} {step['directory']}")
    if dry_run:
        for cycle in pipeline.cycles:
            source = next(k for k in ("tools", "persona", "task") if k in cycle)
            scored = f", scored by {cycle.get('metric', 'tool_use')}" if source == "tools" else ""
            say(f"  cycle {cycle['name']}: {source} {cycle[source]}, dev {cycle.get('dev', 24)},"
                f" held-out {cycle.get('held_out', 48)}{scored}")
        return steps
    engine_dir = pipeline.out / "engine"
    for step in steps:
        stage, directory = step["stage"], Path(step["directory"])
        if step["action"] == "skip":
            continue
        start = time.perf_counter()
        if stage == "engine" and step["action"] == "run":
            # the engine keeps a run made with these cycles and settings (a kill left it, or a
            # key changed by what does not touch it) and replaces any other: see _run_engine
            files.remove(directory / STAGE_FILE)
        _mark(directory, stage, step["key"], "running")
        if stage == "engine":
            result = _run_engine(pipeline, directory, progress=progress, say=say)
            more = {"best_round": result.best_round, "stopped": result.stopped,
                    "max_rounds": pipeline.engine.max_rounds}
        elif stage == "report":
            from promptbake.report import engine_report

            more = {"wrote": engine_report(engine_dir, directory)}
        else:
            more = _export(pipeline, engine_dir, directory, say)
        _mark(directory, stage, step["key"], "done",
              seconds=round(time.perf_counter() - start, 1), **more)
        say(f"{stage}: done in {time.perf_counter() - start:.0f} s")
    return steps


def _run_engine(pipeline: Pipeline, directory: Path, progress: bool, say):
    # a stage killed before the engine wrote its history has nothing to resume
    fresh = not (directory / "engine.json").is_file()
    lm, tokenizer, model_dir = models.load(pipeline.model)
    cycles = build_cycles(pipeline, lm, tokenizer, say, cache=directory / TOOL_CONTEXTS,
                          model_dir=model_dir)
    del lm
    return run_engine(cycles, model=pipeline.model, config=pipeline.engine,
                      bake_config=pipeline.bake, out=directory, overwrite=fresh,
                      replace_changed=True, progress=progress, say=say)


def _export(pipeline: Pipeline, engine_dir: Path, directory: Path, say) -> dict:
    from promptbake.export import export_baked

    final = engine_dir / "final"
    if not final.is_dir():
        say("export: no engine round beat the starting model, so there is nothing to export")
        files.remove(directory / "model")  # an earlier run's export is not this run's
        return {"exported": None}
    options = pipeline.export
    export_baked(final, directory / "model", format=options["format"],
                 strength=options.get("strength", 1.0), quantize=options.get("quantize"),
                 gguf_lora=options.get("gguf_lora"), overwrite=True)
    return {"exported": str(directory / "model")}


def example() -> str:
    """The shipped example pipeline's text (the shipped tools and the pirate persona)."""
    from importlib import resources

    return resources.files("promptbake").joinpath("data/pipelines/example.toml") \
        .read_text("utf-8")


__all__ = ["Pipeline", "PipelineError", "build_cycles", "example", "load", "plan", "run"]
