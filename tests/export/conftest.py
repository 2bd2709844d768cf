"""Shared by the export tests: one torch thread, and a bake with a visible random adapter."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from promptbake.artifact import Baked
from promptbake.framing import Framing


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster than two (per-op overhead dominates), and the
    timings stay sane on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baked_dir(tiny_dir, tokenizer, tmp_path_factory, prompt):
    """A bake with a random (non-zero) LoRA adapter, saved as a bake directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a visible delta
    manifest = {"format": 1, "prompt": {"text": prompt, "sha256": "x"},
                "framing": {"student": "default"},
                "base_model": {"path": str(tiny_dir), "name": "tiny", "sha256": None},
                "config": {"seed": 0, "eval_contexts": 3, "max_new_tokens": 8}}
    path = tmp_path_factory.mktemp("bake") / "pirate"
    Baked(model.eval(), tokenizer, Framing(tokenizer, prompt), manifest,
          held_out=[[{"role": "user", "content": "How do I boil an egg?"}],
                    [{"role": "user", "content": "Name a large river."}]]).save(path)
    return path
