"""A one-off session script (2026-12-07): where a bake's remaining KL lies along the answer.

On a bake's own held-out samples, KL(prompted || base) and KL(prompted || baked) per response
position, summed over bins of positions (0, 1, 2-3, 4-7, ..., 32-63), with each bin's share of
what is left and its reduction. ``python bench/results/prompt-sweep-averaging/positions.py
BAKE_DIR`` (e.g. ``bench/.cache/panel-cat`` after ``python bench/ --only prompts``)."""

import json
import sys
from pathlib import Path

import torch

from promptbake import mc_kl
from promptbake.artifact import load_baked
from promptbake.modeling import BAKED, BASE
from promptbake.trajectories import Trajectories

BINS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]


def main(path: Path) -> None:
    baked = load_baked(path)
    per_token = []  # mc_kl's divergence per batch: the base student's, then the baked one's
    divergence = mc_kl.divergence

    def recorded(student, teacher, **options):
        out = divergence(student, teacher, **options)
        per_token.append(out.detach().clone())
        return out

    mc_kl.divergence = recorded
    samples = Trajectories.load(path / "eval_trajectories.safetensors")
    contexts = json.loads((path / "held_out_contexts.json").read_text())
    mc_kl.kl_on(baked.model, baked.framing, contexts, samples, {"base": BASE, "baked": BAKED},
                pad_id=baked.tokenizer.pad_token_id)
    mc_kl.divergence = divergence
    before, after = torch.cat(per_token[0::2]), torch.cat(per_token[1::2])
    groups = samples.by_context()
    order = [k for c in groups for k in groups[c]]  # the order sequence_kls runs them in
    position = torch.cat([torch.arange(len(samples.responses[k])) for k in order])
    print("positions  tokens  before  after  share of after  reduction")
    for lo, hi in BINS:
        m = (position >= lo) & (position < hi)
        b, a = float(before[m].sum()), float(after[m].sum())
        print(f"{lo}-{hi - 1}  {int(m.sum())}  {b:.2f}  {a:.2f}  {a / float(after.sum()):.3f}  "
              f"{1 - a / b:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
