"""Held-out evaluation of RL stages: the exact KL of a moved policy's greedy answers against
numpy, its figures and the console comparison."""

import json

import jax
import numpy as np
from flax import nnx

from jaxllm.generation import sample_all
from jaxllm.sharding.batch import map_rows
from jaxllm.trainers.rewards import polite
from jaxllm.trainers.rl_eval import comparison_lines, greedy_eval, make_kl_pass, side_by_side
from jaxllm.trainers.rl_loop import setup_stage
from jaxllm.trainers.rollout import eval_rows, layout_rollouts, policy_outputs, stop_ids
from jaxllm.training.state import to_global

from .conftest import rl_config

T = 0.7


def np_kl_rows(z, z_ref, mask, t):
    """Per row: sum over masked positions of KL(softmax(z / t) || softmax(z_ref / t))."""

    def log_softmax(x):
        x = x.astype(np.float64) / t
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(z), log_softmax(z_ref)
    return ((np.exp(lp) * (lp - lq)).sum(-1) * mask).sum(-1)


def test_kl_of_greedy_answers_matches_numpy(tmp_path, tiny_ckpt):
    sec = dict(iterations=1, max_new_tokens=6, eval_examples=8, eval_max_new_tokens=6)
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "p", temperature=T, reward="digits", **sec)
    st = setup_stage(cfg, "ppo", 1)
    sp, rows = st.start, st.val[:8]
    assert len(rows) == 8 and len({tuple(r["ids"]) for r in rows}) == 8  # each prompt once
    noise = jax.random.key(1)
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(noise, x.shape), sp.state.params)
    kl_pass = make_kl_pass(sp.graphdef, st.ref[0], st.mesh, cfg.mesh.rules, T)
    stops, seq_len = stop_ids(st.template), cfg.loader.seq_len

    def evaluate(params):
        def kl(batch):  # map_rows splits the rows over the mesh
            fn = lambda b: kl_pass(params, sp.state.frozen, st.ref[1], b)  # noqa: E731
            return map_rows(fn, batch, st.mesh, st.rules)

        def lengths(texts, recs):
            return np.array([float(len(t)) for t in texts])

        weights = nnx.merge_state(params, sp.state.frozen)
        out = greedy_eval(
            st.sampler, weights, rows, st.tok, lengths, max_new_tokens=6, stop_ids=stops,
            batch_size=4, rules={"polite": polite}, kl=kl, seq_len=seq_len,
        )  # fmt: skip
        return out, weights

    same, _ = evaluate(sp.state.params)
    assert abs(same["kl"]) < 1e-5  # the policy is the reference
    after, weights = evaluate(moved)
    # numpy: each model's logits on prompt + greedy answer, KL at the answer positions
    res = sample_all(
        st.sampler, weights, [r["ids"] for r in rows], batch_size=8,
        key_for=lambda n: jax.random.key(0), max_new_tokens=6, stop_ids=stops,
    )  # fmt: skip
    ro = layout_rollouts([r["ids"] for r in rows], res, st.tok, seq_len)
    assert ro.texts == after["answers"]  # batches of 4 and one of 8 answer alike
    dev = to_global(ro.batch, st.mesh)
    z = np.asarray(policy_outputs(nnx.merge(sp.graphdef, moved, sp.state.frozen), dev)[0])
    z_ref = np.asarray(policy_outputs(nnx.merge(*st.ref), dev)[0])
    want = np_kl_rows(z, z_ref, ro.batch["mask"], T)
    assert want.min() > 1e-3  # the moved policy is measurably elsewhere
    np.testing.assert_allclose(after["kl"], want.mean(), rtol=1e-4)
    assert after["reward"] == round(float(np.mean([len(t) for t in ro.texts])), 4)
    for key in ("polite", "repeat_3gram", "distinct_2", "well_formed", "accuracy"):
        assert 0 <= after[key] <= 1, key


def test_eval_rows_keep_each_prompt_once_in_order():
    rows = [{"ids": [1], "n": 0}, {"ids": [2]}, {"ids": [1], "n": 2}, {"ids": [3]}, {"ids": [4]}]
    assert eval_rows(rows, 10) == [rows[0], rows[1], rows[3], rows[4]]
    assert [r["ids"] for r in eval_rows(rows, 2)] == [[1], [4]]  # evenly spaced


def test_side_by_side_and_console_lines():
    rows = [{"prompt": f"q{i}"} for i in range(6)]
    pairs = side_by_side(rows, [f"b{i}" for i in range(6)], [f"a{i}" for i in range(6)], 3)
    assert pairs == [
        {"prompt": "q0", "before": "b0", "after": "a0"},
        {"prompt": "q2", "before": "b2", "after": "a2"},
        {"prompt": "q5", "before": "b5", "after": "a5"},
    ]
    assert side_by_side(rows, [], [], 3) == []
    ppo = {"side_by_side": pairs[:1], "greedy_reward_before": -1.5, "greedy_reward_after": 2.0,
           "greedy_polite_before": 0.1, "greedy_polite_after": 0.9}  # fmt: skip
    pipeline = {"stages": [{"summary": {"steps": 3}}, {"summary": ppo}]}
    lines = comparison_lines(pipeline)
    assert lines[1:4] == ["  q0", "    before: b0", "    after:  a0"]
    assert lines[-1] == "  reward -1.5 → 2 · polite 0.1 → 0.9"
    assert comparison_lines({"stages": [{"summary": {"steps": 3}}]}) == []
    assert comparison_lines(ppo) == lines


def test_rollout_texts_of_every_process_join_in_row_order(monkeypatch):
    from jaxllm.trainers import rl_iteration

    assert rl_iteration.all_texts(["x", "y"], slice(0, 2)) == ["x", "y"]  # one process
    gathered = [json.dumps([2, ["c", "d"]]), json.dumps([0, ["a", "b"]])]  # process order
    monkeypatch.setattr(rl_iteration, "gather_text", lambda text: gathered)
    assert rl_iteration.all_texts(["c", "d"], slice(2, 4)) == ["a", "b", "c", "d"]
