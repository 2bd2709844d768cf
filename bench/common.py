"""Bakes shared by the benchmark suites, made once and reused from bench/.cache/.

A cached bake is reused only when its manifest records a finished bake of the same prompt, with
the same settings, contexts (path and contents, or the shipped contexts' contents) and base model
weights; otherwise it is baked again (with ``--overwrite``, which only removes files promptbake
wrote).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import time
from pathlib import Path

import promptbake
from promptbake import BakeConfig, contexts as contexts_mod, models
from promptbake.persona import pirate

CACHE = Path(__file__).resolve().parent / ".cache"
PIRATE = pirate().prompt  # the README's persona, from its persona file


def pirate_config(quick: bool) -> BakeConfig:
    """The README's bake (`promptbake bake`'s defaults), with half-baked snapshots for the
    evaluate suite's curve over steps (saving them does not change the bake: tests/test_bake.py);
    ``quick``: a small bake for smoke runs."""
    if quick:
        return BakeConfig(train_contexts=16, eval_contexts=8, epochs=1.0, snapshot_every=2)
    return BakeConfig(snapshot_every=36)


def cached_bake(name: str, prompt: str, config: BakeConfig, contexts=None, log=print,
                make=None) -> dict:
    """{"path", "seconds" (the bake's wall time, 0 when reused), "reused"} of a bake of
    ``prompt`` in bench/.cache/<name>. Processes asking for the same bake (``--section`` runs)
    take turns: the first bakes, the others reuse its bake. ``make(out, overwrite)``: how to
    bake, when not ``promptbake.bake(prompt, ...)`` (``prompt`` then only identifies it)."""
    out = CACHE / name
    if contexts is None:  # the shipped contexts: their contents, as a file's would be
        shipped = json.dumps([contexts_mod.builtin(p) for p in ("train", "held_out")])
        used = {"builtin": hashlib.sha256(shipped.encode()).hexdigest()}
    elif isinstance(contexts, str) and not Path(contexts).is_file():  # generated:N, pools
        used = {"spec": contexts}
    else:
        used = {"path": str(contexts),
                "sha256": hashlib.sha256(Path(contexts).read_bytes()).hexdigest()}
    key = {"prompt": prompt, "config": dataclasses.asdict(config), "contexts": used,
           "model": models.fingerprint(models.ensure_default())}
    stamp = out / "bench-key.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (out / "manifest.json").is_file() and stamp.is_file() and \
                json.loads(stamp.read_text()) == key:
            log(f"    reusing the bake in {out}")
            return {"path": out, "seconds": 0.0, "reused": True}
        log(f"    baking {name} into {out} (a few minutes)")
        start = time.perf_counter()
        if make is None:
            promptbake.bake(prompt, contexts=contexts, config=config, out=out,
                            overwrite=out.exists())
        else:
            make(out, out.exists())
        stamp.write_text(json.dumps(key))
        return {"path": out, "seconds": time.perf_counter() - start, "reused": False}


def answer_counts(score, budget: int) -> dict:
    """How a persona's generated answers go: how many open with the pirate's "Aye", and how many
    run out of tokens (a long digression, or a greedy loop)."""
    return {"n": len(score.items),
            "start_with_aye": sum(i["prediction"].strip().lower().startswith("aye")
                                  for i in score.items),
            "out_of_tokens": sum(i["tokens"] >= budget for i in score.items)}
