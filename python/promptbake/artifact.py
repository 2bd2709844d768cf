"""A bake on disk: its directory, manifest and adapter, written atomically and read back checked.

A bake's directory holds a PEFT adapter (``adapter_model.safetensors`` and
``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` loads), ``manifest.json``
(prompt, base model and its hash, framing, contexts, ``BakeConfig``, KL before and after,
timings, versions, and the size and sha256 of every file it keeps), the held-out contexts and
samples it was measured on, optional ``snapshots/step-N/`` and ``merged/``, and a marker
(``.promptbake.json``) listing every file promptbake wrote there. ``RunDir`` writes it:
temporary names and renames, checkpoints to resume from; ``load_baked`` reads it back after
``read_manifest`` has checked it, and loading mirrors saving.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch

from promptbake import files, modeling, models
from promptbake.config import resume_identity
from promptbake.distributed import SINGLE, World, full, full_lora_state, like
from promptbake.framing import Framing
from promptbake.trajectories import Trajectories

log = logging.getLogger("promptbake")

MANIFEST = "manifest.json"
HELD_OUT = "held_out_contexts.json"  # the contexts the bake was measured on, for `promptbake kl`
HELD_OUT_SAMPLES = "eval_trajectories.safetensors"  # the samples it was measured on
PROBE_SAMPLES = "probe_trajectories.safetensors"  # its samples on the off-distribution probes
CHECKPOINT = "checkpoint.safetensors"  # resume-only: removed when the bake is done
SNAPSHOTS = "snapshots"
MANIFEST_FORMAT = 1

_MANIFEST_FIELDS = ((("prompt", "text"), str), (("base_model", "path"), str),
                    (("base_model", "name"), str), (("framing", "student"), str),
                    (("config",), dict))

_RECORDED = ("adapter_model.safetensors", "adapter_config.json", HELD_OUT,
             HELD_OUT_SAMPLES)  # files whose size and hash a manifest records


@dataclasses.dataclass
class Baked:
    """A baked model: the base weights with the LoRA adapter, and the record of the bake."""

    model: object  # peft.PeftModel
    tokenizer: object
    framing: Framing
    manifest: dict
    path: Path | None = None
    held_out: list | None = None  # the contexts the bake was measured on
    _strength: float = 1.0

    @property
    def prompt(self) -> str | list:
        """The baked prompt: a system text, or a conversation (``framing.prompt_text`` gives
        either as one text)."""
        return self.framing.prompt

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        """Scales the LoRA delta: 0 is the base model, 1 the full bake, between is half-baked."""
        if not math.isfinite(value):
            raise ValueError(f"strength={value} must be a finite number (1 is the full bake)")
        for layer in modeling.lora_layers(self.model):
            for name in layer.scaling:
                layer.set_scale(name, float(value))
        self._strength = float(value)

    def save(self, path: str | Path) -> None:
        """Writes the adapter and manifest to a new directory (for a bake kept in memory)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not empty: choose a new directory")
        path.mkdir(parents=True, exist_ok=True)
        run = RunDir(path, identity="saved from memory")  # the marker lets --overwrite replace it
        run.mark(status="done")
        if self.held_out is not None:
            run.wrote(HELD_OUT)
            files.write_text(path / HELD_OUT, json.dumps(self.held_out, ensure_ascii=False))
        save_adapter(self.model, path, run.wrote)
        run.wrote(MANIFEST)
        self.manifest["files"] = file_record(path)
        files.write_text(path / MANIFEST, files.to_json(self.manifest, indent=2))
        self.path = path

    def generate(self, question: str, *, variant: str = "baked", max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, mode: str | None = None) -> str:
        """An answer to ``question`` by a variant (``modeling.VARIANTS``: ``baked``, ``base``,
        ``prompted``, ``baked+prompt``; the baked ones at this bake's strength); greedy unless
        ``temperature`` > 0. ``mode`` is the old name of ``variant``."""
        if mode is not None:
            warnings.warn("Baked.generate(mode=...) is now variant=...", DeprecationWarning,
                          stacklevel=2)
            variant = mode
        chosen = modeling.variant(variant, self._strength)
        ids = chosen.input_ids(self.framing, [{"role": "user", "content": question}])
        with chosen.active(self.model):
            return answer(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed)


def answer(model, tokenizer, ids: list[int], *, max_new_tokens: int = 128,
           temperature: float = 0.0, seed: int = 0) -> str:
    """``model``'s answer after the token ids ``ids`` (a framed question), greedy unless
    ``temperature`` > 0 (then sampled with ``seed``), decoded without special tokens."""
    torch.manual_seed(seed)
    out = model.generate(input_ids=torch.tensor([ids]),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


class DamagedBake(ValueError):
    """A bake's directory that cannot be loaded as it is: the message names the file and what
    to do."""


def file_record(path: Path) -> dict:
    """{name: {"bytes", "sha256"}} of the bake's files in ``path``, for the manifest."""
    out = {}
    for name in _RECORDED:
        if (Path(path) / name).is_file():
            data = (Path(path) / name).read_bytes()
            out[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def read_manifest(path: str | Path) -> dict:
    """The manifest of the finished bake in ``path``, after checking what ``load_baked`` will
    read: the manifest's schema and version, and the adapter's files (sizes and hashes where the
    manifest records them, else whether they parse). Raises ``DamagedBake`` naming the file."""
    path = Path(path)
    again = ("bake again into a new directory (promptbake bake ... --out DIR), or restore the "
             "directory from a copy")
    if not path.is_dir():
        raise DamagedBake(f"no bake at {path}: the directory does not exist" if not path.exists()
                          else f"{path} is a file: pass a bake's directory")
    file = path / MANIFEST
    if not file.is_file():
        marker = files.read_marker(path)
        if marker is not None and marker.get("status") == "running":
            raise DamagedBake(f"the bake in {path} did not finish (no manifest.json): continue "
                              f"it with the same command and --resume")
        raise DamagedBake(f"{path} holds no finished bake (no manifest.json)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedBake(f"{file} is damaged (not valid JSON: {err}); {again}") from err
    if not isinstance(manifest, dict):
        raise DamagedBake(f"{file} is not a bake's manifest (a JSON object is expected); {again}")
    version = manifest.get("format")
    if isinstance(version, int) and version > MANIFEST_FORMAT:
        raise DamagedBake(f"{file} has format {version}, newer than this promptbake reads "
                          f"({MANIFEST_FORMAT}): upgrade promptbake")
    if version != MANIFEST_FORMAT:
        raise DamagedBake(f"{file} is not a promptbake bake's manifest (format {version!r}, "
                          f"expected {MANIFEST_FORMAT}); {again}")
    for keys, kind in _MANIFEST_FIELDS:
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind):
            raise DamagedBake(f"{file} is not a complete bake manifest: {'.'.join(keys)} is "
                              f"missing or not a {kind.__name__}; {again}")
    if not isinstance(manifest["prompt"].get("messages", []), list):
        raise DamagedBake(f"{file} is not a complete bake manifest: prompt.messages is not a "
                          f"list; {again}")
    if not isinstance(manifest.get("files", {}), dict):
        raise DamagedBake(f"{file} is not a complete bake manifest: files is not an object; "
                          f"{again}")
    _check_files(path, manifest.get("files"), again)
    return manifest


def _check_files(path: Path, recorded, again: str) -> None:
    from safetensors import safe_open

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise DamagedBake(f"{path} has no {name}, the adapter's file; {again}")
    for name, expected in (recorded or {}).items():
        if name not in _RECORDED:
            continue  # only the bake's own files are recorded; anything else is not read
        file = path / name
        if not isinstance(expected, dict) or not file.is_file():
            continue  # an optional file (held-out samples) may be absent
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise DamagedBake(f"{file} is damaged: {size} bytes where the manifest records "
                              f"{expected.get('bytes')} (truncated or replaced?); {again}")
        if hashlib.sha256(file.read_bytes()).hexdigest() != expected.get("sha256"):
            raise DamagedBake(f"{file} is damaged: its sha256 differs from the manifest's; "
                              f"{again}")
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedBake(f"{path / 'adapter_config.json'} is damaged (not valid JSON); "
                          f"{again}") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise DamagedBake(f"{path / 'adapter_config.json'} is not a PEFT adapter config; {again}")
    for name in ("adapter_model.safetensors", HELD_OUT_SAMPLES):
        if not (path / name).is_file():
            continue
        try:  # the header: its length, its JSON and the tensors' offsets
            with safe_open(str(path / name), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise DamagedBake(f"{path / name} is damaged ({err}); {again}") from err
    if (path / HELD_OUT).is_file():
        try:
            json.loads((path / HELD_OUT).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise DamagedBake(f"{path / HELD_OUT} is damaged (not valid JSON); {again}") from err


def load_baked(path: str | Path, strength: float = 1.0, model: str | Path | None = None) -> Baked:
    """A baked model from its directory, with the LoRA delta scaled by ``strength``.

    ``model`` overrides the base model path recorded in the manifest (for a moved directory).
    The directory is checked first (``read_manifest``): a damaged one raises ``DamagedBake``.
    """
    from peft import PeftModel

    path = Path(path)
    manifest = read_manifest(path)
    base = model or manifest["base_model"]["path"]
    if model is None and manifest["base_model"]["name"] == models.DEFAULT:
        base = None  # the default model's cache may have moved: resolve it again
    lm, tokenizer, model_dir = models.load(base)
    if manifest["base_model"].get("sha256") and models.fingerprint(model_dir) != \
            manifest["base_model"]["sha256"]:
        log.warning("promptbake: the base model in %s differs from the one baked on (content "
                    "hash mismatch); the adapter may not behave as measured", model_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(lm, path)
        # PEFT only warns when the file lacks the adapter's weights, and leaves them at init
        missing = [w for w in caught if "missing adapter keys" in str(w.message)]
        if missing:
            raise ValueError(str(missing[0].message)[:200] + "...")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or layer names do not match
        raise DamagedBake(f"the adapter in {path} does not fit the base model {model_dir} "
                          f"({str(err).splitlines()[0]}); pass the model it was baked on with "
                          f"--model") from err
    peft_model.eval()
    framing = Framing(tokenizer, manifest["prompt"].get("messages") or manifest["prompt"]["text"],
                      manifest["framing"]["student"])
    held_out = None
    if (path / HELD_OUT).is_file():
        held_out = json.loads((path / HELD_OUT).read_text(encoding="utf-8"))
    baked = Baked(peft_model, tokenizer, framing, manifest, path, held_out)
    baked.strength = strength
    return baked


# -- the output directory ----------------------------------------------------------------------


class RunDir:
    """The output directory: checkpoints, trajectories, snapshots and the final adapter.

    Files are written under temporary names and renamed; a marker lists what promptbake wrote,
    so ``--overwrite`` never deletes anything else and ``--resume`` knows the bake it continues.
    In a distributed bake rank 0 writes everything but each rank's share of the trajectories
    (``trajectories-rank{r}of{n}``), which that rank writes; every rank reads the checkpoint.
    """

    def __init__(self, path: Path | None, identity: str, world: World = SINGLE):
        self.path = path
        self.identity = identity
        self.resume = False
        self.world = world
        self.writes = path is not None and world.writes

    @classmethod
    def prepare(cls, out, prompt, config, contexts, model, *, overwrite: bool,
                resume: bool, world: World = SINGLE, teacher_model=None,
                rehearse=()) -> "RunDir":
        """Checks that the bake may use ``out``; writes nothing (see ``create``)."""
        if resume and overwrite:
            raise ValueError("--resume continues the bake in --out and --overwrite replaces it: "
                             "choose one")
        inputs = [prompt, resume_identity(config), contexts_key(contexts),
                  str(Path(model).expanduser().resolve()) if model is not None else models.DEFAULT]
        if teacher_model is not None:  # by its weights: one retrained in place is another
            inputs.append(models.fingerprint(models.resolve(teacher_model)))
        if rehearse:
            inputs.append([list(r) for r in rehearse])
        identity = hashlib.sha256(json.dumps(inputs, sort_keys=True,
                                             default=str).encode()).hexdigest()
        if out is None:
            if resume:
                raise ValueError("resume needs the output directory of the bake to continue")
            return cls(None, identity, world)
        path = Path(out)
        marker = files.read_marker(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; choose a directory")
        populated = path.is_dir() and any(path.iterdir())
        if resume:
            if marker is None:
                raise ValueError(f"nothing to resume in {path}: it holds no promptbake bake")
            if marker.get("identity") != identity:
                raise ValueError(f"the bake in {path} used another prompt, configuration, model "
                                 f"or contexts; pass the same ones to resume, or --overwrite to "
                                 f"start again")
            if marker.get("status") == "done":
                raise ValueError(f"the bake in {path} already finished; --overwrite bakes again")
            if marker.get("world_size", 1) != world.size:
                raise ValueError(f"the bake in {path} ran on {marker.get('world_size', 1)} "
                                 f"process(es) and this run has {world.size}: resume with the "
                                 f"same number (its trajectories are shared that way)")
        elif populated:
            if not overwrite:
                raise ValueError(f"output directory {path} exists and is not empty: pass "
                                 f"--overwrite to replace a previous bake there, --resume to "
                                 f"continue one, or choose another --out")
            if marker is None:
                raise ValueError(f"{path} holds files promptbake did not write; refusing to "
                                 f"overwrite it: choose another --out")
        files.check_writable(path)  # now, not after minutes of loading and sampling
        run = cls(path, identity, world)
        run.resume = resume
        return run

    def create(self, model_sha256: str, held_out: list) -> None:
        """Makes the directory (removing what a previous bake wrote there, when replacing it), or
        checks that a resumed bake has the same base model weights."""
        if not self.writes:
            return
        files.remove_temporaries(self.path)  # left by a process killed mid-write
        if self.resume:
            if files.read_marker(self.path).get("model_sha256") != model_sha256:
                raise ValueError(f"the base model's weights changed since the bake in {self.path} "
                                 f"started; --overwrite to start again")
            return
        marker = files.read_marker(self.path)
        if marker is not None:
            for name in files.marked_files(self.path, marker):
                files.remove(self.path / name)
            files.remove(self.path / files.MARKER)
        self.path.mkdir(parents=True, exist_ok=True)
        self.mark(status="running", files=[HELD_OUT], model_sha256=model_sha256,
                  world_size=self.world.size)
        files.write_text(self.path / HELD_OUT, json.dumps(held_out, ensure_ascii=False))

    def mark(self, **changes) -> None:
        """Updates the marker: ``files`` are added to the list of what promptbake wrote here,
        other keys (status, ...) replace their values."""
        marker = files.read_marker(self.path) or {"kind": "bake", "identity": self.identity,
                                                   "files": []}
        names = set(marker.get("files", [])) | set(changes.pop("files", []))
        marker.update(changes, files=sorted(names))
        files.write_text(self.path / files.MARKER, json.dumps(marker, indent=1))

    def wrote(self, *names: str) -> None:
        """Records files promptbake writes (or is about to) in the directory."""
        if self.writes:
            self.mark(files=list(names))

    def _share(self, name: str, rank: int) -> str:
        world = self.world
        return f"{name}-rank{rank}of{world.size}.safetensors" if world.distributed else \
            f"{name}.safetensors"

    def load_trajectories(self, name: str) -> Trajectories | None:
        """This rank's trajectories ``name`` saved by an interrupted run, or None."""
        if self.path is None or not (self.path / self._share(name, self.world.rank)).is_file():
            return None
        return Trajectories.load(self.path / self._share(name, self.world.rank))

    def save_trajectories(self, name: str, trajectories: Trajectories) -> None:
        if self.path is not None:
            self.wrote(*[self._share(name, r) for r in range(self.world.size)])
            trajectories.save(self.path / self._share(name, self.world.rank))

    def save_whole(self, name: str, parts: list[Trajectories]) -> None:
        """Every rank's share of the samples ``name`` as the one file a one-process bake leaves
        (``HELD_OUT_SAMPLES``, ``PROBE_SAMPLES``), written by rank 0."""
        if self.writes:
            self.wrote(f"{name}.safetensors")
            Trajectories.merged(parts).save(self.path / f"{name}.safetensors")

    def copy_in(self, source: Path, name: str) -> None:
        """Copies ``source / name`` (a file of another bake's directory) into this one."""
        if self.path is not None and (Path(source) / name).is_file():
            self.wrote(name)
            files.write_with(self.path / name,
                             lambda tmp: tmp.write_bytes((Path(source) / name).read_bytes()))

    def checkpoint(self, model, optimizer, schedule, step: int, history: list) -> None:
        """What resuming needs, as safetensors (tensors) and JSON (the rest): no pickle. A
        sharded model's tensors are gathered whole first (every rank takes part)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        tensors = {f"adapter/{k}": full(v).contiguous() for k, v in
                   get_peft_model_state_dict(model).items()}
        optim = optimizer.state_dict()
        for index, state in optim["state"].items():
            tensors.update({f"optimizer/{index}/{k}": full(v) for k, v in state.items()})
        if not self.writes:  # ranks hold the same state: rank 0 saves it
            return
        tensors["rng"] = torch.get_rng_state()
        rest = {"param_groups": optim["param_groups"], "schedule": schedule.state_dict(),
                "optimizer_state": {str(i): sorted(st) for i, st in optim["state"].items()},
                "step": step, "history": history}
        self.wrote(CHECKPOINT)
        files.write_with(self.path / CHECKPOINT, lambda tmp: save_file(
            tensors, str(tmp), metadata={"state": json.dumps(rest)}))

    def restore(self, model, optimizer, schedule) -> tuple[int, list]:
        if self.path is None:
            return 0, []
        if (self.path / "checkpoint.pt").is_file() and not (self.path / CHECKPOINT).is_file():
            raise ValueError(f"{self.path} holds a checkpoint an earlier promptbake wrote as a "
                             f"pickle (checkpoint.pt), which promptbake no longer loads: start "
                             f"again with --overwrite")
        if not (self.path / CHECKPOINT).is_file():
            return 0, []
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(self.path / CHECKPOINT), framework="pt") as f:
            rest = json.loads(f.metadata()["state"])
        tensors = load_file(str(self.path / CHECKPOINT))
        current = get_peft_model_state_dict(model)  # a sharded model's tensors are sharded back
        set_peft_model_state_dict(model, {k[len("adapter/"):]: like(v, current[k[len("adapter/"):]])
                                          for k, v in tensors.items() if k.startswith("adapter/")})
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.load_state_dict({
            "state": {int(i): {k: like(tensors[f"optimizer/{i}/{k}"], params[int(i)])
                               for k in keys}
                      for i, keys in rest["optimizer_state"].items()},
            "param_groups": rest["param_groups"]})
        schedule.load_state_dict(rest["schedule"])
        torch.set_rng_state(tensors["rng"])
        log.info("resuming at step %d", rest["step"])
        return rest["step"], rest["history"]

    def snapshot(self, model, step: int) -> None:
        state = full_lora_state(model)  # a sharded model's adapter, gathered on every rank
        if not self.writes:
            return
        name = f"{SNAPSHOTS}/step-{step:06d}"
        self.wrote(SNAPSHOTS)
        files.replace_dir(self.path / name, lambda tmp: write_adapter(model, tmp, state))

    def finish(self, baked: Baked, merge: bool) -> None:
        """The adapter (and with ``merge`` a merged model in ``merged/``), before the manifest."""
        state = full_lora_state(baked.model)  # a sharded model's adapter, gathered on every rank
        if not self.writes:
            return
        save_adapter(baked.model, self.path, self.wrote, state)
        if merge:
            self.wrote("merged")
            write_merged(baked, self.path / "merged", baked.strength)
        self.wrote(MANIFEST)

    def write_manifest(self, manifest: dict) -> None:
        if not self.writes:
            return
        manifest["files"] = file_record(self.path)
        files.write_text(self.path / MANIFEST, files.to_json(manifest, indent=2))
        self.mark(status="done")
        shares = ("trajectories", "eval_trajectories", "probe_trajectories") \
            if self.world.distributed else ("trajectories",)
        for name in [CHECKPOINT] + [self._share(n, r) for n in shares
                                    for r in range(self.world.size)]:
            files.remove(self.path / name)  # only needed to resume; the adapter is saved


def sources(baked, model=None) -> tuple[Path, ...]:
    """What an output made from ``baked`` (a ``Baked`` or a bake's directory) must not replace:
    the bake's directory and its base model's (``model``, or the one the manifest records)."""
    if isinstance(baked, Baked):
        path, manifest = baked.path, baked.manifest
    else:
        path, manifest = Path(baked), read_manifest(baked)
    base = model or (manifest.get("base_model") or {}).get("path")
    return tuple(Path(p) for p in (path, base) if p)


def record_files(path: Path, names: list[str]) -> None:
    """Adds ``names`` (files promptbake just wrote into the bake in ``path``: a report, curves)
    to its marker, so that a later ``--overwrite`` removes them with the rest."""
    if files.read_marker(path) is not None:
        RunDir(Path(path), identity="").wrote(*names)


def contexts_key(contexts) -> str:
    """What identifies the contexts of a bake for --resume: a file by its contents."""
    if isinstance(contexts, (str, Path)) and Path(contexts).is_file():
        return "sha256:" + hashlib.sha256(Path(contexts).read_bytes()).hexdigest()
    return json.dumps(contexts, sort_keys=True, default=str)


def save_adapter(model, path: Path, record, state: dict | None = None) -> None:
    """The PEFT adapter files at the top of ``path`` (peft.PeftModel.from_pretrained loads it);
    ``record(*names)`` hears of them before they appear. ``state``: the LoRA tensors to write
    in place of the model's own (a sharded model's, gathered whole)."""
    files.write_into(path, lambda tmp: write_adapter(model, tmp, state),
                     lambda names: record(*names))


SET_FIELDS = ("target_modules", "exclude_modules")  # sets in PEFT's config, lists in its file


def write_adapter(model, directory: Path, state: dict | None = None) -> None:
    """``model.save_pretrained(directory)`` (a PEFT model; ``state`` as in ``save_adapter``),
    with the module names PEFT keeps in sets written sorted: PEFT writes a set in its iteration
    order, which differs between processes, so the same adapter saved twice (a bake and the
    same bake resumed) would give two ``adapter_config.json`` files and two sha256 values."""
    model.save_pretrained(directory, **({} if state is None else {"state_dict": state}))
    for config in Path(directory).rglob("adapter_config.json"):
        fields = json.loads(config.read_text())
        for name in SET_FIELDS:
            if isinstance(fields.get(name), list):
                fields[name] = sorted(fields[name])
        config.write_text(json.dumps(fields, indent=2, sort_keys=True))


def snapshot_steps(path) -> list[tuple[int, Path]]:
    """(step, directory) of every half-baked snapshot in a baked directory, by step."""
    found = [(int(d.name.split("-")[-1]), d) for d in (Path(path) / SNAPSHOTS).glob("step-*")
             if (d / "adapter_model.safetensors").is_file()]
    return sorted(found)


# -- merged models -----------------------------------------------------------------------------


def merged_model(baked: Baked, strength: float, in_place: bool = False):
    """A transformers causal LM (eval mode) with ``baked``'s adapter merged at ``strength``:
    W' = W + strength * (lora_alpha / r) * B A for every adapted layer. ``in_place`` consumes
    ``baked`` (its model becomes the merged one); otherwise the merge works on a copy."""
    if not math.isfinite(strength):
        raise ValueError(f"strength={strength} must be a finite number (1 is the full bake)")
    # merge_and_unload rewrites the base weights and removes the adapter: a Baked the caller
    # keeps is merged on a copy.
    model = baked.model if in_place else copy.deepcopy(baked.model)
    for layer in modeling.lora_layers(model):
        for name in layer.scaling:
            layer.set_scale(name, float(strength))  # what merge_and_unload multiplies B A by
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def write_merged(baked, out: Path, strength: float, *, in_place: bool = False) -> Path:
    """Writes the model merged at ``strength`` as a safetensors model directory (weights, config,
    tokenizer, ``manifest.json``) at ``out``, replacing it whole: for a caller that owns ``out``
    (a bake's ``merged/``; ``export.save_merged`` checks a user's ``--out`` first)."""
    model = merged_model(baked, strength, in_place=in_place)
    manifest = {"format": 1, "kind": "merged", "strength": float(strength),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": source_record(baked)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        baked.tokenizer.save_pretrained(tmp)
        models.make_portable(tmp)
        (tmp / MANIFEST).write_text(files.to_json(manifest, indent=2))

    files.replace_dir(out, write, kind="merged")
    log.info("wrote the model merged at strength %g to %s", strength, out)
    return out


def source_record(baked) -> dict:
    """What an export records about the bake it came from."""
    manifest = baked.manifest or {}
    return {"bake": str(Path(baked.path).resolve()) if baked.path else None,
            "prompt_sha256": manifest.get("prompt", {}).get("sha256"),
            "base_model": manifest.get("base_model"),
            "framing": manifest.get("framing", {}).get("student"),
            "kl_reduction": manifest.get("kl", {}).get("reduction")}

