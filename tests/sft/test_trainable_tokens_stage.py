"""`peft.trainable_tokens` on a chat-token-grown import (hf.chat_tokens): with LoRA alone the
grown `<|end|>` keeps its near-mean embedding row and head column, so fine-tuning can hardly
teach the model to end an answer; training those rows as well raises p(<|end|>) there."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxllm.config import PeftConfig, from_dict  # noqa: E402
from jaxllm.config.peft import DEFAULT_TARGETS  # noqa: E402
from jaxllm.interop import load_tokenizer  # noqa: E402
from jaxllm.models.peft import TokenParam, apply_peft  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.tokenizer.chat import ChatTemplate  # noqa: E402
from jaxllm.trainers.checkpoint_model import peft_token_ids  # noqa: E402
from jaxllm.trainers.hf_import import import_hf  # noqa: E402
from jaxllm.trainers.lm import load_checkpoint_model  # noqa: E402

from ..interop.test_chat_tokens import make_hf_dir  # noqa: E402
from .conftest import ROOT  # noqa: E402

CHAT = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")
L = 48


def chat_batch(tok, n: int = 8):
    """Short conversations rendered by the chat template, right-padded to L: tokens,
    next-token targets, the answer mask, and where the answer's `<|end|>` is the target."""
    rows = [json.loads(x) for x in (ROOT / "jaxllm/assets/sft/train.jsonl").open()]
    template, end = ChatTemplate(tok), tok.special_ids["<|end|>"]
    toks, masks = [], []
    for r in rows:
        if "prompt" not in r:
            continue
        conv = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]  # fmt: skip
        out = template.render(conv)
        if len(out.ids) <= L and end in out.ids:
            toks.append(out.ids + [0] * (L + 1 - len(out.ids)))
            masks.append(out.mask + [0] * (L + 1 - len(out.mask)))
        if len(toks) == n:
            break
    ids, mask = np.array(toks, np.int32), np.array(masks, np.float32)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:], (ids[:, 1:] == end) & (mask[:, 1:] > 0)


def test_trainable_tokens_teach_a_grown_end_token_lora_alone_cannot(tmp_path):
    make_hf_dir(tmp_path / "hf")
    cfg = from_dict({"stage": "import", "hf": {"path": str(tmp_path / "hf"), "chat_tokens": True}})
    summary = import_hf(tmp_path / "hf", tmp_path / "imp", cfg)
    tok_path = summary["outputs"]["tokenizer"]
    tokens, targets, mask, at_end = chat_batch(load_tokenizer(tok_path))
    assert at_end.sum() == 8
    mesh = make_mesh(from_dict({"stage": "sft"}).mesh, jax.devices()[:1])
    graphdef, state, _, _ = load_checkpoint_model(tmp_path / "imp/checkpoints", mesh)

    peft = PeftConfig("lora", 4, 8.0, targets=DEFAULT_TARGETS, trainable_tokens=CHAT)
    model = nnx.merge(graphdef, state)
    with nnx.use_eager_sharding(False):
        apply_peft(model, peft, nnx.Rngs(0), peft_token_ids(peft, tok_path))
    # one program for both runs: LoRA alone is the same model with the token deltas kept at
    # zero (the base's rows), their gradients scaled by `tokens_train` = 0
    g, deltas, lora, frozen = nnx.split(model, TokenParam, nnx.LoRAParam, ...)
    tx = optax.adam(1e-2)

    def logp(p):
        return jax.nn.log_softmax(nnx.merge(g, *p, frozen)(tokens), -1)

    @jax.jit
    def target_logp(p):
        return jnp.take_along_axis(logp(p), targets[..., None], -1)[..., 0]

    def loss(p):
        return -(target_logp(p) * mask).sum() / mask.sum()

    @jax.jit
    def step(p, opt, tokens_train):
        grad_deltas, grad_lora = jax.grad(loss)(p)
        grads = (jax.tree.map(lambda x: x * tokens_train, grad_deltas), grad_lora)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(p, updates), opt

    p_end = []
    for tokens_train in (0.0, 1.0):
        p = (deltas, lora)
        opt = tx.init(p)
        for _ in range(20):
            p, opt = step(p, opt, tokens_train)
        p_end.append(float(np.exp(np.asarray(target_logp(p))[at_end]).mean()))
    lora_only, with_tokens = p_end
    # LoRA alone leaves <|end|> among near-identical grown columns; the deltas separate it
    assert with_tokens > 0.2 and with_tokens > 10 * lora_only, (lora_only, with_tokens)
