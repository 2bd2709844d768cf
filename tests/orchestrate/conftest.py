"""Shared by the orchestration tests: small bake settings, logits to compare models by, and a
first bake to build on."""

import pytest
import torch

from promptbake import BakeConfig, bake


def config(**changes) -> BakeConfig:
    """Bake settings small enough for the tiny model."""
    base = dict(train_contexts=4, eval_contexts=3, samples_per_context=2, max_new_tokens=8,
                sample_batch=8, batch_size=4, steps=6, lr=2e-2, warmup=0.0)
    return BakeConfig(**{**base, **changes})


def logits(model, ids=(1, 2, 3, 4, 5, 6)):
    """A model's logits on a fixed input."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0]


@pytest.fixture(scope="module")
def first(tiny_dir, tmp_path_factory, prompt):
    out = tmp_path_factory.mktemp("pursuit") / "round0"
    bake(prompt, model=tiny_dir, config=config(), out=out)
    return out


@pytest.fixture(scope="session")
def round_config():
    return config


@pytest.fixture(scope="session")
def model_logits():
    return logits
