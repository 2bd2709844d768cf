"""Merging a bake into plain weights: equal to the adapter at each strength, and a directory
transformers loads alone."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from promptbake import modeling
from promptbake.artifact import load_baked
from promptbake.export import merge, save_merged


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_merge_equals_the_adapter_at_strength(baked_dir, strength):
    baked = load_baked(baked_dir)
    ids = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        with modeling.adapter(baked.model, enabled=True, strength=strength):
            want = baked.model(input_ids=ids).logits
        merged = merge(baked, strength)
        got = merged(input_ids=ids).logits
        base = baked.model.get_base_model()
        with modeling.adapter(baked.model, enabled=False):
            plain = baked.model(input_ids=ids).logits
    assert not hasattr(merged, "peft_config") and not modeling.lora_layers(merged)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (strength == 0) == torch.allclose(got, plain, atol=1e-5)
    # the Baked itself is untouched: still an adapter at strength 1
    assert baked.strength == 1.0 and modeling.lora_layers(baked.model) and base is not merged


def test_save_merged_is_a_directory_transformers_loads_alone(baked_dir, tmp_path):
    out = save_merged(baked_dir, tmp_path / "merged", strength=0.5)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([list(range(7, 30))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits,
                                   merge(baked_dir, 0.5)(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strength"] == 0.5 and manifest["kind"] == "merged"
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="earlier merged export: pass --overwrite"):
        save_merged(baked_dir, out)
