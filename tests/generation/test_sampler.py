"""Sampling filters against numpy, and the KV-cache sampler against greedy full recomputation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import GenerateConfig, ModelConfig
from jaxllm.errors import JaxllmError, PromptError
from jaxllm.generation import Sampler, generate_text, sample_logits, token_logprobs
from jaxllm.generation import sampler as sampler_mod
from jaxllm.generation.sampling import filter_logits
from jaxllm.models import make_decoder

# ------------------------------------------------------------------- sampling functions


def random_logits(rows=64, vocab=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, vocab)) * 3, jnp.float32)


sample = jax.jit(sample_logits)  # every setting traced: one compile serves all


def test_greedy_top_k_1_and_tiny_top_p_are_argmax():
    logits = random_logits()
    argmax = np.argmax(np.asarray(logits), axis=-1)
    key = jax.random.key(0)
    np.testing.assert_array_equal(sample_logits(logits, key, temperature=0.0), argmax)
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1, 1.0), argmax)
    np.testing.assert_array_equal(sample(logits, key, 1.0, 0, 1e-4), argmax)
    # a traced temperature of 0 is greedy too
    np.testing.assert_array_equal(sample(logits, key, jnp.float32(0.0), 0, 1.0), argmax)


def test_sampling_is_deterministic_per_key():
    logits = random_logits() / 3  # flatter, so different keys give different draws
    a = sample(logits, jax.random.key(1), 1.0, 0, 1.0)
    np.testing.assert_array_equal(a, sample(logits, jax.random.key(1), 1.0, 0, 1.0))
    assert not np.array_equal(a, sample(logits, jax.random.key(2), 1.0, 0, 1.0))


def test_top_k_keeps_only_the_k_best():
    row = random_logits(1, 30, seed=3)
    draws = np.asarray(sample(jnp.tile(row, (3000, 1)), jax.random.key(0), 2.0, 3, 1.0))
    top3 = set(np.argsort(-np.asarray(row[0]))[:3].tolist())
    assert set(draws.tolist()) == top3


def np_filter_keep(logits, k, p):
    """HF order: keep the k largest (ties kept), then the smallest most-likely set of the
    renormalised rest whose probabilities sum to >= p."""
    keep = np.zeros(logits.shape, bool)
    for i, row in enumerate(logits.astype(np.float64)):
        allowed = row >= np.sort(row)[::-1][k - 1] if k else np.ones(row.shape, bool)
        probs = np.where(allowed, np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        total = 0.0
        for j in np.argsort(-row, kind="stable"):
            if not allowed[j]:
                break
            keep[i, j] = True
            total += probs[j]
            if total >= p:
                break
    return keep


@pytest.mark.parametrize("k,p", [(0, 0.05), (0, 0.3), (0, 0.6), (0, 0.9), (5, 1.0), (5, 0.6)])
def test_filter_logits_matches_numpy(k, p):
    logits = random_logits(16, 20, seed=4) / 2
    got = np.isfinite(np.asarray(jax.jit(filter_logits)(logits, k, p)))
    np.testing.assert_array_equal(got, np_filter_keep(np.asarray(logits), k, p))


def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_token_logprobs_matches_numpy(temperature):
    logits = np.asarray(random_logits(4, 10))
    tokens = np.array([0, 3, 9, 5])
    ref = np_log_softmax(logits, temperature)[np.arange(4), tokens]
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    traced = jax.jit(token_logprobs)(jnp.asarray(logits), jnp.asarray(tokens), temperature)
    np.testing.assert_allclose(traced, ref, atol=1e-5)


# -------------------------------------------------------------------------- the sampler

V = 80
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
CONFIGS = {
    "gpt2": ModelConfig(**BASE, init_std=0.2),  # learned positions, biases, tied
    "llama": ModelConfig(
        **BASE,
        init_std=0.2,
        norm="rmsnorm",
        mlp="swiglu",
        positions="rope",
        n_kv_heads=2,
        use_bias=False,
        tie_embeddings=False,
    ),  # fmt: skip
}
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 9, 30, 31, 2, 7]]
NEW = 8


@functools.cache
def model(name: str, seed: int = 0):
    return nnx.split(make_decoder(CONFIGS[name], seed))


@functools.cache
def full_forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def reference_logits(name, seq, seed=0):
    """Full forward pass (no cache) over one sequence, right-padded to 32 (causal: harmless)."""
    graphdef, state = model(name, seed)
    buf = np.zeros((1, 32), np.int32)
    buf[0, : len(seq)] = seq
    return np.asarray(full_forward(graphdef)(state, buf)[0, : len(seq)])


def reference_greedy(name, prompt, n, seed=0):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(reference_logits(name, seq, seed)[-1])))
    return seq[len(prompt) :]


def run(name, seed=0, **kw):
    graphdef, state = model(name, seed)
    kw = {"max_new_tokens": NEW, "key": jax.random.key(0), **kw}
    return Sampler(graphdef)(state, PROMPTS, **kw)


def check_logprobs(name, res, seed=0, temperature=1.0, atol=1e-4):
    """Each returned log-prob is numpy's log_softmax(full-forward logits / T)[token]."""
    for prompt, toks, logps in zip(PROMPTS, res.tokens, res.logprobs):
        logits = reference_logits(name, prompt + toks, seed)[len(prompt) - 1 : -1]
        ref = np_log_softmax(logits, temperature)[np.arange(len(toks)), toks]
        np.testing.assert_allclose(logps, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_cached_decoding_equals_full_recompute(name):
    res = run(name)
    for prompt, toks in zip(PROMPTS, res.tokens):
        assert toks == reference_greedy(name, prompt, NEW)
    assert res.num_tokens == [NEW] * 4 and res.stopped == [False] * 4
    check_logprobs(name, res)


def test_sampling_with_filters_is_deterministic_and_logprobs_are_tempered_unfiltered():
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    res = run("llama", key=jax.random.key(3), **kw)
    assert res == run("llama", key=jax.random.key(3), **kw)
    assert res.tokens != run("llama", key=jax.random.key(4), **kw).tokens
    check_logprobs("llama", res, temperature=0.8)  # of logits / T, before top-k / top-p
    for prompt, toks in zip(PROMPTS, res.tokens):  # every token within the raw top 10
        logits = reference_logits("llama", prompt + toks)[len(prompt) - 1 : -1]
        ranks = (logits > logits[np.arange(len(toks)), toks][:, None]).sum(-1)
        assert (ranks < 10).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_are_those_of_the_sampling_temperature(name):
    """At T = 0.5 (prompts of 1 to 11 tokens) the reported log-probs are log_softmax(z / T),
    the distribution the tokens were drawn from, not the raw T = 1 ones; T = 1 reports raw."""
    res = run(name, key=jax.random.key(5), temperature=0.5)
    check_logprobs(name, res, temperature=0.5)
    with pytest.raises(AssertionError):
        check_logprobs(name, res, temperature=1.0)
    check_logprobs(name, run(name, key=jax.random.key(5), temperature=1.0))


def test_top_k_1_sampler_equals_greedy():
    greedy = run("llama")
    assert run("llama", temperature=1.3, top_k=1).tokens == greedy.tokens
    assert run("llama", temperature=1.3, top_p=1e-4).tokens == greedy.tokens


def test_stop_token_ends_a_row_while_others_continue():
    free = run("gpt2").tokens
    # a token that row 0 generates at step 2 (its first time) but row 1 never does
    stop = next(t for t in free[0][2:] if t not in free[1])
    res = run("gpt2", stop_ids=[stop, 999])
    for toks, free_toks, n, stopped in zip(res.tokens, free, res.num_tokens, res.stopped):
        end = free_toks.index(stop) + 1 if stop in free_toks else NEW
        assert toks == free_toks[:end] and n == end and stopped == (stop in free_toks)
    assert res.stopped[0] and res.num_tokens[0] < NEW and res.num_tokens[1] == NEW


def test_new_params_do_not_recompile_and_change_outputs():
    first = run("gpt2")
    sizes = (sampler_mod._prefill._cache_size(), sampler_mod._decode._cache_size())
    second = run("gpt2", seed=1)  # same architecture, fresh weights
    assert (sampler_mod._prefill._cache_size(), sampler_mod._decode._cache_size()) == sizes
    assert first.tokens != second.tokens
    for prompt, toks in zip(PROMPTS, second.tokens):
        assert toks == reference_greedy("gpt2", prompt, NEW, seed=1)


def test_max_new_tokens_one_and_length_check():
    res = run("gpt2", max_new_tokens=1)
    assert res.num_tokens == [1] * 4
    assert [t[0] for t in res.tokens] == [t[0] for t in run("gpt2").tokens]
    # a JaxllmError (one line from `python -m jaxllm.main`) that is still a ValueError
    with pytest.raises(PromptError, match="max_seq_len") as e:
        run("gpt2", max_new_tokens=60)  # learned positions stop at 64
    assert isinstance(e.value, JaxllmError) and isinstance(e.value, ValueError)
    graphdef, state = model("gpt2")
    with pytest.raises(PromptError, match="vocab_size"):
        Sampler(graphdef)(state, [[1, V]], max_new_tokens=2, key=jax.random.key(0))


class CharTokenizer:
    """Printable ASCII from ' ' as ids 0..79."""

    def encode(self, text, add_bos=False):
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


def test_generate_text_decodes_and_cuts_at_stop():
    graphdef, state = model("gpt2")
    tok = CharTokenizer()
    prompts = [tok.decode(p) for p in PROMPTS] + ["hi"]
    free = run("gpt2").tokens
    stop_char = tok.decode([free[0][3]])
    cfg = GenerateConfig(max_new_tokens=NEW, batch_size=4, stop=(stop_char,), add_bos=False)
    texts = generate_text(graphdef, state, tok, prompts, cfg, key=jax.random.key(0))
    assert len(texts) == 5
    for text, toks in zip(texts, free):
        full = tok.decode(toks)
        assert text == full[: full.index(stop_char)] if stop_char in full else text == full


def test_generate_text_stops_at_eos_and_adds_no_missing_bos():
    graphdef, state = model("gpt2")
    free = run("gpt2").tokens
    eos = free[0][2]

    class NoBosTokenizer(CharTokenizer):  # an imported Qwen2's: an EOS, no BOS
        bos_id, eos_id = -1, eos

        def encode(self, text, add_bos=False):
            assert not add_bos, "a BOS asked of a tokenizer without one"
            return super().encode(text)

    tok = NoBosTokenizer()
    prompts = [tok.decode(p) for p in PROMPTS]
    cfg = GenerateConfig(max_new_tokens=NEW, batch_size=4, stop=("\x7f",), add_bos=True)
    texts = generate_text(graphdef, state, tok, prompts, cfg, key=jax.random.key(0))
    assert texts[0] == tok.decode(free[0][: free[0].index(eos)])  # stop: "\x7f" kept EOS on
