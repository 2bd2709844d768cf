"""Orchestration: loops of bakes built from public pieces.

* ``stacking``: LoRA deltas extracted and stacked, a prompt baked on top of a baked model
  (``LoraStack.push``);
* ``plateau``: the plateau and stopping rules (when a loop of rounds stops, which round it keeps);
* ``pursuit``: prompt pursuit (Eq. 4) and sequential baking, each a short loop over the two.

A new orchestration is another short loop over ``LoraStack``, ``plateau`` and the evaluators.
"""

from promptbake.orchestrate.plateau import gains, meets_target, plateau_round, plateaued, stopping
from promptbake.orchestrate.pursuit import Pursuit, Round, Sequential, pursue, sequential
from promptbake.orchestrate.stacking import LoraStack, bake_on_top, lora_deltas, stack

__all__ = ["LoraStack", "Pursuit", "Round", "Sequential", "bake_on_top", "gains", "lora_deltas",
           "meets_target", "plateau_round", "plateaued", "pursue", "sequential", "stack",
           "stopping"]
