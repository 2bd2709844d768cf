"""Decode latency after a long prompt: 32 greedy tokens (EOS ignored) after prompts of 100, 500
and 1000 ids, median over the steps of 3 runs, the exports taking turns (a session script kept
with its output, in attention.txt).

    python bench/results/infer-graph/long.py EXPORT_DIR [EXPORT_DIR ...]
"""
import sys
from pathlib import Path

import numpy as np

from promptbake.export import OnnxLM

lms = {Path(p).name: OnnxLM(p, threads=2) for p in sys.argv[1:]}
for n in (100, 500, 1000):
    ids = [1000 + (7 * k) % 20000 for k in range(n)]
    steps = {k: [] for k in lms}
    for _ in range(3):
        for k, lm in lms.items():
            steps[k] += lm.generate([ids], 32, eos_token_ids=()).step_seconds
    print(n, "  ".join(f"{k} {1e3 * np.median(v):.2f}" for k, v in steps.items()))
