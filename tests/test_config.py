"""BakeConfig: bad settings are refused before any work, and a manifest's settings read back."""

import json

import pytest

from promptbake import BakeConfig


@pytest.mark.parametrize("field", ["lr", "temperature", "alpha", "max_grad_norm", "epochs"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* must be a finite number"):
        BakeConfig(**{field: value}).validate()


def test_from_manifest_reads_back_what_a_bake_recorded(small_bake):
    manifest = json.loads((small_bake / "manifest.json").read_text())
    config = BakeConfig.from_manifest(manifest)
    assert config.steps == 2 and config.lr == 2e-2 and config.max_new_tokens == 6
    assert BakeConfig.from_manifest({"config": {**manifest["config"], "unknown": 1}}) == config
    assert BakeConfig.from_manifest({}) == BakeConfig()
