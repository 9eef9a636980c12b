"""Multi-turn episodes with a tool (`grpo.env: calculator`): the calculator against Python's
own arithmetic on randomly built expression trees and its refusals (no `eval`), an episode
of a scripted model against the real calculator laid out by hand (environment tokens have
loss mask 0, the model's 1, with their sampler log-probs), and a rollout of a real tiny
model whose log-probs agree with the learner's across turns."""

from __future__ import annotations

import builtins
import random
import re

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.errors import ConfigError
from jaxllm.generation import SampleResult
from jaxllm.trainers.envs import CalculatorEnv, CalculatorError, calculate, get_env
from jaxllm.trainers.episodes import Episode, cut_at, layout_episodes, model_turn, run_episodes
from jaxllm.trainers.rewards import arithmetic, tool_call
from jaxllm.trainers.rl_loop import setup_stage
from jaxllm.trainers.rollout import logprob_gap, stop_ids
from jaxllm.training.state import to_global

from .conftest import rl_config
from .env_worker import EveryWordEnv


def _tree(rng: random.Random, depth: int) -> tuple[str, int]:
    """A random expression (compound operands bracketed) and its value, computed alongside
    the text (never parsed)."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 999)
        return (str(n), n) if rng.random() < 0.9 else (f"-{n}", -n)
    (a, x), (b, y) = _tree(rng, depth - 1), _tree(rng, depth - 1)
    op = rng.choice("+-*")
    value = x + y if op == "+" else x - y if op == "-" else x * y
    a, b = (s if s.isdigit() else f"({s})" for s in (a, b))
    return f"{a}{rng.choice(['', ' '])}{op}{rng.choice(['', ' '])}{b}", value


def test_calculator_matches_python_arithmetic():
    rng, checked = random.Random(0), 0
    for _ in range(400):
        text, value = _tree(rng, 3)
        if len(text) > 64:
            continue
        assert calculate(text) == value, text
        checked += 1
    assert checked > 100
    assert calculate("17+25") == 42 and calculate("2+3*4") == 14 and calculate("-(5-9)") == 4


@pytest.mark.parametrize(
    "expr, why",
    [
        ("__import__('os').system('ls')", "character"), ("2**10", "Pow"), ("7/2", "character"),
        ("1.5+1", "character"), ("1_000", "character"), ("abs(-3)", "character"),
        ("007", "malformed"), ("1+", "malformed"), ("()", "Tuple"), ("", "empty"),
        ("9" * 20 + "*" + "9" * 20, "digits"), ("(" * 40 + "1" + ")" * 40, "longer"),
    ],
)  # fmt: skip
def test_calculator_refuses_everything_else_without_eval(expr, why, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(CalculatorError, match=why):
        calculate(expr)
    obs, reward, done = CalculatorEnv().step(f"<tool>{expr}</tool>")
    assert obs.startswith("<result>error: ") and obs.endswith("</result>")
    assert (reward, done) == (0.0, False)


def test_calculator_env_steps_and_registry():
    env = CalculatorEnv()
    assert env.reset({"answer": "42"}) == ""
    assert env.step("let me see <tool>17 + 25</tool>") == ("<result>42</result>", 0.0, False)
    assert env.step("42") == ("", 0.0, True)  # no call: the final answer
    assert env.step("<tool>1+1</tool> and more")[2] is True  # a call must end the turn
    assert get_env("calculator") is CalculatorEnv
    with pytest.raises(ConfigError, match="grpo.env.*calculator"):
        get_env("python")


def test_bad_tool_config_is_one_clear_error(tmp_path):
    from jaxllm.config import from_dict, read_yaml

    from .conftest import ROOT

    raw = read_yaml(ROOT / "configs/tiny_grpo_tool.yaml")
    raw["grpo"]["max_turns"] = 0
    with pytest.raises(ConfigError, match="'grpo.max_turns': must be >= 1"):
        from_dict(raw)
    raw["grpo"].update(max_turns=3, overlong_buffer=4)
    with pytest.raises(ConfigError, match="overlong_buffer.*per turn with env"):
        from_dict(raw)


class ScriptedModel:
    """A "model" that reads its context: asked "What is a + b?" with no result yet it calls
    the calculator (with `wrong` operands when set, or an unsafe call) and keeps writing past
    `</tool>` (what a real model does: the runner must cut there); after a `<result>` it
    answers with the result's number. Log-probs are -position/100 (recognisable)."""

    def __init__(self, tok, end: int):
        self.tok, self.end, self.calls, self.row_ids = tok, end, [], []

    def reply(self, ids: list[int]) -> tuple[list[int], bool]:
        text = self.tok.decode(ids)
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", text).groups())
        results = re.findall(r"<result>(-?\d+)</result>", text)
        if a == 1:  # answers without the tool, wrongly
            return self.tok.encode(str(a + b + 1)) + [self.end], True
        if a == 2 and "error" not in text:
            call = "<tool>os.system(1)</tool>"
        elif not results:
            call = f"<tool>{a}+{b}</tool>"
        else:
            return self.tok.encode(results[-1]) + [self.end], True
        junk = self.tok.encode("<result>7</result>7")
        return self.tok.encode(call) + junk + [self.end], True

    def __call__(self, weights, prompts, *, max_new_tokens, key, temperature, stop_ids, row_ids):
        self.calls.append(len(prompts))
        self.row_ids.append(list(row_ids))
        out = [self.reply(list(p)) for p in prompts]
        toks = [t[:max_new_tokens] for t, _ in out]
        logps = [[-(len(p) + j) / 100 for j in range(len(t))] for p, t in zip(prompts, toks)]
        stopped = [s and len(t) == len(full) for (full, s), t in zip(out, toks)]
        return SampleResult(toks, logps, [len(t) for t in toks], stopped)


def test_scripted_episodes_layout_by_hand(tok, template):
    end = template.ids["<|end|>"]
    questions = [(17, 25), (1, 5), (2, 30)]  # tool, no tool (wrong), unsafe call then tool
    rows = [
        {"ids": template.prompt_ids([{"role": "user", "content": f"What is {a} + {b}?"}]),
         "answer": str(a + b)}
        for a, b in questions
    ]  # fmt: skip
    model = ScriptedModel(tok, end)
    ro = run_episodes(
        model, None, rows, [CalculatorEnv() for _ in rows], tok, seq_len=256,
        max_new_tokens=40, max_turns=4, key=jax.random.key(0), temperature=1.0,
        stop_ids=[end],
    )  # fmt: skip
    enc = tok.encode
    # row 0 by hand: call (cut at </tool>), result, answer
    p = rows[0]["ids"]
    call, obs, ans = enc("<tool>17+25</tool>"), enc("<result>42</result>"), enc("42") + [end]
    want = p + call + obs + ans
    n = len(want)
    assert ro.batch["tokens"][0, :n].tolist() == want and not ro.batch["tokens"][0, n:].any()
    is_model = [0] * len(p) + [1] * len(call) + [0] * len(obs) + [1] * len(ans)
    np.testing.assert_array_equal(ro.batch["mask"][0, : n - 1], is_model[1:])  # target j + 1
    assert ro.batch["mask"][0, n - 1 :].sum() == 0
    logp = ro.batch["sampler_logp"][0]
    turn1 = [-(len(p) + j) / 100 for j in range(len(call))]
    turn2 = [-(len(p) + len(call) + len(obs) + j) / 100 for j in range(len(ans))]
    np.testing.assert_allclose(logp[len(p) - 1 : len(p) - 1 + len(call)], turn1, rtol=1e-6)
    at = len(p) + len(call) + len(obs) - 1
    np.testing.assert_allclose(logp[at : at + len(ans)], turn2, rtol=1e-6)
    assert not logp[len(p) + len(call) - 1 : at].any()  # environment tokens: no log-prob
    np.testing.assert_array_equal(ro.batch["targets"][0, : n - 1], want[1:])
    np.testing.assert_array_equal(ro.batch["positions"][0, :n], np.arange(n))
    assert ro.batch["segment_ids"][0].tolist() == [1] * n + [0] * (256 - n)
    # texts, rewards: the final answer is the text after the last </result>
    assert ro.texts[0] == "<tool>17+25</tool><result>42</result>42"
    assert ro.texts[1] == "7"
    assert ro.texts[2] == (
        "<tool>os.system(1)</tool><result>error: unsupported character 'o' (integers, + - * "
        "and ())</result><tool>2+30</tool><result>32</result>32"
    )
    got = [(arithmetic(t, r), tool_call(t)) for t, r in zip(ro.texts, rows)]
    assert got == [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)]
    assert ro.batch["env_reward"].tolist() == [0.0, 0.0, 0.0]
    # turn by turn: 3 live rows, then 2 (row 1 answered), then 1 (row 2's second call)
    assert model.calls == [3, 2, 1]
    assert model.row_ids == [[0, 1, 2], [0, 2], [2]]  # each live episode's own row id


def test_max_turns_and_room_end_episodes(tok, template):
    end = template.ids["<|end|>"]
    rows = [{"ids": template.prompt_ids([{"role": "user", "content": "What is 17 + 25?"}])}]

    class Stubborn(CalculatorEnv):  # a result the model never accepts: it calls again
        def step(self, text):
            return "<think>again</think>", 0.25, False

    model = ScriptedModel(tok, end)
    ro = run_episodes(
        model, None, rows, [Stubborn()], tok, seq_len=128, max_new_tokens=40, max_turns=2,
        key=jax.random.key(0), temperature=1.0, stop_ids=[end],
    )  # fmt: skip
    assert model.calls == [1, 1] and ro.texts[0].count("<tool>") == 2
    assert ro.batch["env_reward"].tolist() == [0.5]  # the step rewards add up
    model = ScriptedModel(tok, end)
    room = len(rows[0]["ids"]) + 40 + 3  # the first turn fits, the second does not
    ro = run_episodes(
        model, None, rows, [Stubborn()], tok, seq_len=room, max_new_tokens=40, max_turns=4,
        key=jax.random.key(0), temperature=1.0, stop_ids=[end],
    )  # fmt: skip
    assert model.calls == [1] and ro.batch["tokens"].shape == (1, room)


def test_cut_at_the_token_that_completes_the_stop(tok):
    ids = tok.encode("ab <tool>3*4</tool><result>12</result>")
    k = cut_at(tok, ids, "</tool>")
    assert tok.decode(ids[:k]).endswith("</tool>") and "</tool>" not in tok.decode(ids[: k - 1])
    assert cut_at(tok, tok.encode("no call here"), "</tool>") is None


class MergedTok:
    """Characters, plus one merged piece `><` (id 1000) as GPT-2 / Llama BPE vocabularies
    have: `</tool><` is then completed by a token that carries one more character."""

    def encode(self, s):
        out, i = [], 0
        while i < len(s):
            out.append(1000 if s.startswith("><", i) else ord(s[i]))
            i += 2 if out[-1] == 1000 else 1
        return out

    def decode(self, ids):
        return "".join("><" if t == 1000 else chr(t) for t in ids)


class SpyCalculator(CalculatorEnv):
    def __init__(self):
        self.seen = []

    def step(self, text):
        self.seen.append(text)
        return super().step(text)


def test_tool_call_completed_by_a_merged_token_reaches_the_env():
    tok = MergedTok()
    prompt = tok.encode("Q:")
    sampled = tok.encode("<tool>17+25</tool><result>7")  # '><' completes '</tool>'
    logps = [-(j + 1) / 100 for j in range(len(sampled))]
    env = SpyCalculator()
    ep = Episode(prompt=prompt, env=env)
    model_turn(ep, sampled, logps, stopped=False, tok=tok, seq_len=128)
    # the env reads the turn up to '</tool>' and answers: a tool call, not a final answer
    assert env.seen == ["<tool>17+25</tool>"] and not ep.done
    # kept: the sampled tokens through the completing '><' (the model's, with their sampler
    # log-probs), then the observation as environment tokens; nothing sampled after it
    k = sampled.index(1000) + 1
    obs = tok.encode("<result>42</result>")
    assert ep.tokens == sampled[:k] + obs
    assert ep.model == [True] * k + [False] * len(obs)
    assert ep.logps == logps[:k] + [0.0] * len(obs)
    ro = layout_episodes([ep], tok, 64)
    n = len(prompt) + k + len(obs)
    want_mask = [0.0] * (len(prompt) - 1) + [1.0] * k + [0.0] * (64 - len(prompt) + 1 - k)
    np.testing.assert_array_equal(ro.batch["mask"][0], want_mask)
    np.testing.assert_allclose(ro.batch["sampler_logp"][0, len(prompt) - 1 : n - len(obs) - 1],
                               logps[:k], rtol=1e-6)  # fmt: skip
    assert ro.texts[0] == "<tool>17+25</tool><<result>42</result>"


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of zeros in a 0/1 vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[1], flags, [1]])))
    return list(zip(edges[::2], edges[1::2]))


def test_multi_turn_rollout_logprobs_agree_with_the_learner(tmp_path, tiny_ckpt):
    sec = dict(iterations=1, max_new_tokens=8, eval_examples=0, temperature=1.0, max_turns=2)
    sec.update(prompts_per_iteration=2, group_size=4, minibatch_size=8, env="calculator")
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **sec)
    st = setup_stage(cfg, "grpo", 1)
    assert st.episodes is not None and st.episodes.max_turns == 2
    sp = st.start
    weights = nnx.merge_state(sp.state.params, sp.state.frozen)
    rows = st.rows[:: max(1, len(st.rows) // 8)][:8]
    envs = [EveryWordEnv() for _ in rows]
    ro = run_episodes(
        st.sampler, weights, rows, envs, st.tok, seq_len=cfg.loader.seq_len, max_new_tokens=8,
        max_turns=2, key=jax.random.key(1), temperature=1.0, stop_ids=stop_ids(st.template),
    )  # fmt: skip
    batch, mask = ro.batch, ro.batch["mask"]
    reset, obs = st.tok.encode("<result>"), st.tok.encode("<result>7</result>")
    continued = 0
    for i, env in enumerate(envs):  # the response's non-model tokens are exactly the env's
        n_p, n = len(rows[i]["ids"]), int(batch["segment_ids"][i].sum())
        resp, is_model = batch["tokens"][i, n_p:n], mask[i, n_p - 1 : n - 1]
        runs = [resp[a:b].tolist() for a, b in _runs(is_model)]
        assert runs[0] == reset and all(r == obs for r in runs[1:]), (runs, reset, obs)
        assert env.steps - 1 <= len(runs) - 1 <= env.steps  # the last one may not fit
        assert batch["env_reward"][i] == env.steps
        continued += any(is_model[b:].any() for _, b in _runs(is_model)[1:])
    assert continued >= 2  # rows where the model wrote again after an observation
    dev = to_global(batch, st.mesh)
    sc = jax.device_get(st.score(sp.state.params, sp.state.frozen, st.ref[1], dev))
    on = mask > 0
    np.testing.assert_allclose(batch["sampler_logp"][on], sc["logp"][on], atol=1e-5, rtol=0)
    assert logprob_gap(batch["sampler_logp"], sc["logp"], mask, 1e-5)[1] <= 1e-5
    # as two processes would play them (rows 0-3 and 4-7, fewer live at each turn): every
    # episode draws by its global row, so each comes out the same as in the whole batch
    for part in (slice(0, 4), slice(4, 8)):
        half = run_episodes(
            st.sampler, weights, rows[part], [EveryWordEnv() for _ in rows[part]], st.tok,
            seq_len=cfg.loader.seq_len, max_new_tokens=8, max_turns=2, key=jax.random.key(1),
            temperature=1.0, stop_ids=stop_ids(st.template), first_row=part.start,
        )  # fmt: skip
        np.testing.assert_array_equal(half.batch["tokens"], batch["tokens"][part])
        np.testing.assert_allclose(half.batch["sampler_logp"], batch["sampler_logp"][part],
                                   atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.slow  # ~30 s: a whole stage (its parts are tested above)
def test_grpo_stage_plays_episodes_in_rollouts_and_greedy_eval(tmp_path, tiny_ckpt, monkeypatch):
    import json

    from jaxllm.rundir import RunDir
    from jaxllm.trainers import grpo
    from jaxllm.trainers.envs import ENVS

    monkeypatch.setitem(ENVS, "every_word", EveryWordEnv)
    sec = dict(iterations=1, max_new_tokens=6, eval_examples=4, eval_max_new_tokens=6)
    sec.update(prompts_per_iteration=2, group_size=4, minibatch_size=8, env="every_word")
    sec.update(max_turns=2, eval_rules=["tool_call"])
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **sec)
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(grpo.run(cfg, run_dir))
    row = json.loads((tmp_path / "g/metrics.jsonl").read_text().splitlines()[-1])
    assert row["logprob_gap"] < 1e-5  # checked in the loop too (logprob_tol)
    assert row["reward"] >= 1.0  # arithmetic (0 or 1) + the env's 1 per step, >= 1 step each
    assert "greedy_tool_call_before" in summary and "greedy_tool_call_after" in summary
    # the greedy answers are episodes: each starts with the reset observation
    assert all(s["answer"].startswith("<result>") for s in summary["samples_after"])
