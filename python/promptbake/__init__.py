"""promptbake: distil a prompt into a LoRA update of a causal LM (Prompt Baking, arXiv 2409.13697)."""

from importlib.metadata import PackageNotFoundError, version

from promptbake.bake import BakeConfig, Baked, bake, load_baked
from promptbake.nn import DivergenceLoss
from promptbake.ops import backends, divergence

try:
    __version__ = version("promptbake")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["BakeConfig", "Baked", "DivergenceLoss", "__version__", "backends", "bake", "divergence",
           "load_baked"]
