"""promptbake: distil a prompt into a LoRA update of a causal LM (Prompt Baking, arXiv 2409.13697)."""

from promptbake.artifact import Baked, load_baked
from promptbake.bake import bake
from promptbake.config import BakeConfig
from promptbake.nn import DivergenceLoss
from promptbake.ops import backends, divergence
from promptbake.orchestrate import pursue, sequential
from promptbake.versions import promptbake_version

__version__ = promptbake_version()

__all__ = ["BakeConfig", "Baked", "DivergenceLoss", "__version__", "backends", "bake", "divergence",
           "load_baked", "pursue", "sequential"]
