"""Time to first token alone: one greedy token after prompts of 20, 60 and 150 ids, median of 8,
the exports taking turns (a session script kept with its output, prefill lines in speed.txt).

    python bench/results/infer-graph/prefill.py EXPORT_DIR [EXPORT_DIR ...]
"""
import sys
import time
from pathlib import Path

import numpy as np

from promptbake.export import OnnxLM

lms = {Path(p).name: OnnxLM(p, threads=2) for p in sys.argv[1:]}
for n in (20, 60, 150):
    ids = list(range(1000, 1000 + n))
    seconds = {k: [] for k in lms}
    for _ in range(8):
        for k, lm in lms.items():
            start = time.perf_counter()
            lm.generate([ids], 1, eos_token_ids=())
            seconds[k].append(time.perf_counter() - start)
    print(n, "  ".join(f"{k} {1e3 * np.median(v):.1f}" for k, v in seconds.items()))
