"""Logits at response positions: each prompt run once for its samples, the model's own logits."""

import pytest
import torch

from promptbake import modeling, models

CONTEXTS = [[{"role": "user", "content": q}] for q in
            ("What is the capital of France?", "How do I boil an egg?", "Hi!")]


@pytest.fixture(scope="module")
def tiny(tiny_framed):
    return tiny_framed


@pytest.mark.parametrize("attention", ["sdpa", "eager", modeling.GROUPED])
@pytest.mark.parametrize("shared_start", [False, True])
def test_response_logits_share_each_prompt_and_match_full_forwards(tiny_dir, tiny, attention,
                                                                   shared_start, monkeypatch):
    # Several responses after one prompt: the prompt runs once, its cache (with its autograd
    # history) serves them all; logits and gradients equal separate whole-sequence forwards.
    # With shared_start the prompts' common start (the template's system turn) also runs once.
    # With GROUPED attention the prompts and the responses are packed into one row, one pass.
    # (Llama's RMSNorm computes in fp32 even in a fp64 model: agreement is to fp32 rounding.)
    lm, tok, _ = models.load(tiny_dir)
    before = lm.config._attn_implementation
    with modeling.use_attention(lm, attention):
        assert lm.config._attn_implementation == attention
        _check_response_logits(lm, tok, tiny[2], attention == modeling.GROUPED, shared_start,
                               monkeypatch)
    assert lm.config._attn_implementation == before


def _check_response_logits(lm, tok, f, packed, shared_start, monkeypatch):
    prefixes = [f.student_ids(c) for c in CONTEXTS]  # of different lengths
    start = modeling.common_start(prefixes)
    assert 4 <= start < min(len(p) for p in prefixes)
    monkeypatch.setattr(modeling, "SHARED_START", 4 if shared_start else 10**6)
    passes = []
    lm.model.register_forward_hook(lambda module, args, kwargs, out: passes.append(
        kwargs["input_ids"].shape), with_kwargs=True)
    responses = [[[11, 12, 13, 14], [15]], [[16, 17]], [[18], [19, 20, 21]]]
    weight = lm.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    probe = torch.randn(11, len(tok), generator=torch.Generator().manual_seed(0))

    shared = modeling.response_logits(lm, prefixes, responses, tok.pad_token_id)
    ours = len(passes)
    (shared * probe).sum().backward()
    grad_shared, weight.grad = weight.grad, None
    full = []
    for prefix, group in zip(prefixes, responses):
        for r in group:
            logits = lm(input_ids=torch.tensor([prefix + r])).logits[0]
            full.append(logits[len(prefix) - 1:-1])
    full = torch.cat(full)
    (full * probe).sum().backward()

    lengths = [len(p) - (start if shared_start else 0) for p in prefixes]
    inputs = sum(len(r) - 1 for group in responses for r in group)
    assert passes[0] == ((1, start) if shared_start else
                         (1, sum(lengths) + inputs) if packed else (3, max(lengths)))
    assert ours == (1 if packed else 2) + shared_start  # packed: one pass for all
    assert shared.shape == (4 + 1 + 2 + 1 + 3, len(tok)) and torch.isfinite(shared).all()
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert float((grad_shared - weight.grad).norm() / weight.grad.norm()) < 1e-5
    with pytest.raises(ValueError, match="non-empty"):
        modeling.response_logits(lm, prefixes[:2], [[[]], [[1]]], tok.pad_token_id)


@pytest.mark.parametrize("name,extra", [
    ("Gemma2", {"final_logit_softcapping": 0.5, "head_dim": 16}),
    ("Granite", {"logits_scaling": 4.0}),
    ("Cohere", {"logit_scale": 0.25}),
])
def test_post_processed_logits_are_the_models_own(name, extra):
    # Some architectures transform the LM head's output; response_logits must give the model's
    # own logits, and without promptbake's knowledge of the transform check_logits refuses.
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, **extra)
    lm = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    ids = [1, 2, 3, 4, 5, 6]
    ours = modeling.response_logits(lm, [ids[:2]], [[ids[2:]]], pad_id=0)
    with torch.no_grad():
        theirs = lm(input_ids=torch.tensor([ids])).logits[0, 1:-1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    modeling.check_logits(lm, ids)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "finish_logits", lambda config, logits: logits)
        with pytest.raises(ValueError, match="cannot compute its logits"):
            modeling.check_logits(lm, ids)


def test_unknown_logit_post_processing_is_refused(tiny_dir, monkeypatch):
    lm, tok, _ = models.load(tiny_dir)
    monkeypatch.setattr(modeling, "finish_logits", lambda config, logits: logits * 2.0)
    with pytest.raises(ValueError, match="cannot compute its logits"):
        modeling.check_logits(lm, [1, 2, 3, 4])


def test_common_start_leaves_each_prefix_a_token_of_its_own():
    assert modeling.common_start([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert modeling.common_start([[1, 2, 3], [1, 2, 3]]) == 2  # the same prefix twice
    assert modeling.common_start([[7, 8], [1, 2]]) == 0
    assert modeling.common_start([[1, 2, 3]]) == 0  # nothing to share with
    from promptbake import decoding

    assert decoding.shared_prefix(None, []) is None  # no prefixes: nothing run


def test_a_shared_start_serves_a_prefix_with_one_token_of_its_own(tiny_dir, monkeypatch):
    # The shortest prefix keeps one token after the shared start; single-token responses only.
    lm, _, _ = models.load(tiny_dir)
    monkeypatch.setattr(modeling, "SHARED_START", 2)
    start = [5, 6, 7, 8]
    prefixes = [start + [9], start + [10, 11, 12]]
    responses = [[[13], [14]], [[15]]]
    shared = modeling.response_logits(lm, prefixes, responses, pad_id=0)
    with torch.no_grad():
        full = torch.cat([lm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1]
                          for p, group in zip(prefixes, responses) for r in group])
    assert modeling.common_start(prefixes) == 4
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
