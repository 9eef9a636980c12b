"""A trained reward model (`stage: reward`) as a scorer for other stages: loaded as fixed
weights (LoRA merged), the scalar head read at each row's last real token, and texts scored
in batches over the mesh (PPO's rewards and its greedy evaluation)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.models.heads import last_token_index, with_scalar_head
from jaxllm.sharding.batch import map_rows
from jaxllm.trainers.lm import load_frozen_model


def load_reward_model(ckpt_dir: str | Path, mesh, rules: str = "dp"):
    """A `stage: reward` checkpoint as a fixed model (LoRA merged) for scoring or as PPO
    `consts`: `(graphdef, state, shardings, model_cfg, meta)`; `meta["tokenizer"]` names
    its tokenizer."""
    return load_frozen_model(Path(ckpt_dir), mesh, rules, wrap=with_scalar_head)


def sequence_scores(model, tokens_BL, segment_ids_BL, positions_BL, key=None) -> jax.Array:
    """r_B: the scalar model's value at each row's last real token (segment id > 0)."""
    s_BL = model(
        tokens_BL,
        positions_BL=positions_BL,
        segment_ids_BL=segment_ids_BL,
        deterministic=key is None,
        key=key,
    )
    idx_B = last_token_index(segment_ids_BL)
    return jnp.take_along_axis(s_BL, idx_B[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnums=0)
def reward_scores(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
) -> jax.Array:
    """r_B (f32) of rows of prompt + response: jitted, `graphdef` static, `state` from
    `load_reward_model`. Rows may be left- or right-padded: padding has segment id 0; the
    reward is read at the last position with segment id > 0."""
    model = nnx.merge(graphdef, state)
    return sequence_scores(model, tokens_BL, segment_ids_BL, positions_BL)


def text_scores(
    graphdef: nnx.GraphDef, state: nnx.State, tok: Any, seq_len: int, end_id: int, mesh: Mesh,
    rules: str,
):  # fmt: skip
    """`scores(texts, rows) -> r [N]` (float64 on every process): each row's prompt ids + the
    encoded text + `end_id`, cut to `seq_len`, scored in one batch split over the mesh."""

    def scores(texts: list[str], rows: list[dict]) -> np.ndarray:
        tokens = np.zeros((len(texts), seq_len), np.int32)
        seg = np.zeros((len(texts), seq_len), np.int32)
        for i, (text, row) in enumerate(zip(texts, rows)):
            ids = (list(row["ids"]) + tok.encode(text, add_bos=False) + [end_id])[:seq_len]
            tokens[i, : len(ids)] = ids
            seg[i, : len(ids)] = 1
        positions = np.arange(seq_len, dtype=np.int32)[None] * seg
        batch = {"tokens": tokens, "segment_ids": seg, "positions": positions}
        fn = lambda b: reward_scores(graphdef, state, b["tokens"], b["segment_ids"],  # noqa: E731
                                     b["positions"])  # fmt: skip
        return map_rows(fn, batch, mesh, rules).astype(np.float64)

    return scores


def model_rewards(key: str, ckpt: str, cfg, st):
    """A reward checkpoint as an RL stage's reward: `(batch_scores(batch) -> r [B] on the
    rollout rows, text_scores(texts, rows) -> r [N] for greedy evaluation)`. `key` names the
    config key that gave `ckpt` (errors name it; "" in `ckpt`: none was given)."""
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.checkpoint_model import check_same_vocab
    from jaxllm.trainers.rollout import stop_ids

    if not ckpt:
        raise ConfigError(
            f"config key '{key}': a `model` reward needs a reward checkpoint (or "
            "inputs.reward_checkpoint, which a pipeline fills from a `stage: reward`)"
        )
    rg, rstate, _, rm, rmeta = load_reward_model(Path(ckpt), st.mesh, st.rules)
    check_same_vocab(key, rm, rmeta, st.start.model, st.tok_path)

    def batch_scores(batch) -> jax.Array:
        return reward_scores(rg, rstate, batch["tokens"], batch["segment_ids"], batch["positions"])

    end_id = stop_ids(st.template)[0]
    return batch_scores, text_scores(rg, rstate, st.tok, cfg.loader.seq_len, end_id, st.mesh,
                                     st.rules)  # fmt: skip
