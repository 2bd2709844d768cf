"""Decode latency of ONNX exports beside torch with the prompt, as ``python bench/ --only
infer`` measures them (its ``torch_decode``, ``OnnxLM.generate``), on fewer contenders: a
session script, kept with its output (speed.txt), for exports made before and after a change.

    python bench/results/infer-graph/speed.py BAKE_DIR EXPORT_DIR [EXPORT_DIR ...]

Six held-out prompts x 48 greedy tokens (EOS ignored), twice, the contenders taking turns; two
threads; the torch row is the base model with the prompt, fp32 eager (the suite's).
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from infer import torch_decode  # noqa: E402

from promptbake import contexts as contexts_mod, load_baked  # noqa: E402
from promptbake.export import OnnxLM  # noqa: E402

baked = load_baked(sys.argv[1])
base = baked.model.get_base_model()
held = contexts_mod.builtin("held_out")[:6]
teacher = [baked.framing.teacher_ids(c) for c in held]
student = [baked.framing.student_ids(c) for c in held]
onnx = {Path(p).name: OnnxLM(p, threads=torch.get_num_threads()) for p in sys.argv[2:]}
steps = {k: [] for k in ["torch+prompt", *onnx]}
first = {k: [] for k in steps}
for _ in range(2):
    for k in range(len(held)):
        with baked.model.disable_adapter():
            ttft, s = torch_decode(base, teacher[k], 48)
        steps["torch+prompt"] += s
        first["torch+prompt"].append(ttft)
        for name, lm in onnx.items():
            g = lm.generate([student[k]], 48, eos_token_ids=())
            steps[name] += g.step_seconds
            first[name].append(g.prefill_seconds)
for k, v in steps.items():
    print(f"{k:14s} decode p50 {1e3 * np.median(v):6.2f} ms  p95 {1e3 * np.percentile(v, 95):6.2f}"
          f"  ttft p50 {1e3 * np.median(first[k]):6.1f} ms  n={len(v)}")
