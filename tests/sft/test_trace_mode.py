"""Reasoning traces in SFT: keep, mask (in the input, out of the loss) or drop `<think>…</think>`."""

import copy
import json

import numpy as np
import pytest

from jaxllm.config import LoaderConfig
from jaxllm.data.sft import apply_trace, example_features, make_sft_eval_dataset

PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have?"
CONV = [
    {"role": "user", "content": PROBLEM},
    {"role": "assistant", "content": "<think>3 + 5 = 8</think>8"},
]
# a user turn quoting the tags, and a second assistant turn with a trace
MULTI = [
    {"role": "system", "content": "Think first."},
    {"role": "user", "content": "Say <think>hi</think> please"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>2 + 2 = 4</think>4"},
]


def pieces(tok, parts):
    """Ids and full-length role mask from (text or special, learnt) parts, each encoded alone."""
    ids, mask = [], []
    for text, learn in parts:
        if isinstance(text, list):  # ids already
            piece = text
        else:
            piece = [tok.special_ids[text]] if text in tok.special_ids else tok.encode(text)
        ids += piece
        mask += [learn] * len(piece)
    return ids, mask


def expected(tok, trace_learnt: int, dropped: bool = False):
    """CONV's ids and shifted loss mask, built piece by piece (not through the template)."""
    trace = [] if dropped else [("<think>", trace_learnt), ("3 + 5 = 8", trace_learnt),
                                ("</think>", trace_learnt)]  # fmt: skip
    parts = [("<s>", 0), ("<|user|>", 0), (PROBLEM, 0), ("<|end|>", 0), ("<|assistant|>", 0),
             *trace, ("8", 1), ("<|end|>", 1), ("</s>", 1)]  # fmt: skip
    ids, mask = pieces(tok, parts)
    return ids[:-1], ids[1:], mask[1:]


def test_encode_maps_the_trace_tags_to_their_special_ids(tok):
    think, end = tok.special_ids["<think>"], tok.special_ids["</think>"]
    ids = tok.encode("<think>3 + 5 = 8</think>8")
    assert ids == [think, *tok.encode("3 + 5 = 8"), end, *tok.encode("8")]
    assert tok.decode(ids) == "<think>3 + 5 = 8</think>8"


@pytest.mark.parametrize("mode, learnt, dropped", [("keep", 1, False), ("mask", 0, False),
                                                   ("drop", 1, True)])  # fmt: skip
def test_modes_on_a_hand_example(template, mode, learnt, dropped):
    f = example_features(CONV, template, train_on_prompt=False, trace=mode)
    tokens, targets, mask = expected(template.tok, learnt, dropped)
    np.testing.assert_array_equal(f["tokens"], tokens)
    np.testing.assert_array_equal(f["targets"], targets)
    np.testing.assert_array_equal(f["loss_mask"], mask)
    learnt_text = template.tok.decode(f["targets"][f["loss_mask"] == 1])
    want = {"keep": "<think>3 + 5 = 8</think>8", "mask": "8", "drop": "8"}[mode]
    assert learnt_text == want + "<|end|></s>"


def test_default_is_keep(template):
    a = example_features(CONV, template, train_on_prompt=False)
    b = example_features(CONV, template, train_on_prompt=False, trace="keep")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_mask_touches_only_assistant_traces(template):
    tok = template.tok
    for train_on_prompt in (False, True):
        p = 1 if train_on_prompt else 0
        # a user's "<think>" is text (user turns are encoded plain), never a trace to mask
        user = tok.encode("Say <think>hi</think> please", specials=False)
        assert tok.special_ids["<think>"] not in user
        parts = [("<s>", 0), ("<|system|>", p), ("Think first.", p), ("<|end|>", p),
                 ("<|user|>", p), (user, p), ("<|end|>", p), ("<|assistant|>", p), ("ok", 1), ("<|end|>", 1),
                 ("<|user|>", p), ("What is 2 + 2?", p), ("<|end|>", p), ("<|assistant|>", p),
                 ("<think>", 0), ("2 + 2 = 4", 0), ("</think>", 0), ("4", 1), ("<|end|>", 1),
                 ("</s>", 1)]  # fmt: skip
        ids, mask = pieces(tok, parts)
        f = example_features(MULTI, template, train_on_prompt=train_on_prompt, trace="mask")
        np.testing.assert_array_equal(f["tokens"], ids[:-1])
        np.testing.assert_array_equal(f["loss_mask"], mask[1:])


def test_apply_trace_is_pure_and_edits_assistant_turns_only():
    before = copy.deepcopy(MULTI)
    dropped = apply_trace(MULTI, "drop")
    assert before == MULTI
    assert [m["content"] for m in dropped] == ["Think first.", "Say <think>hi</think> please",
                                              "ok", "What is 2 + 2?", "4"]  # fmt: skip
    assert apply_trace(MULTI, "keep") == MULTI == apply_trace(MULTI, "mask")
    two = [{"role": "user", "content": "q"},
           {"role": "assistant", "content": "<think>a\nb</think>x<think>c</think>y"}]  # fmt: skip
    assert apply_trace(two, "drop")[1]["content"] == "xy"
    with pytest.raises(ValueError, match="trace: expected one of keep, mask, drop"):
        apply_trace(CONV, "hide")


def test_an_unclosed_trace_is_left_alone(template):
    conv = [CONV[0], {"role": "assistant", "content": "<think>3 + 5 = 8"}]
    keep = example_features(conv, template, train_on_prompt=False)
    masked = example_features(conv, template, train_on_prompt=False, trace="mask")
    np.testing.assert_array_equal(keep["loss_mask"], masked["loss_mask"])
    assert apply_trace(conv, "drop") == conv


def test_sft_batches_take_the_trace_option(tmp_path, template):
    path = tmp_path / "r.jsonl"
    rec = {"prompt": PROBLEM, "response": "<think>3 + 5 = 8</think>8"}
    path.write_text(json.dumps(rec) + "\n")
    cfg = LoaderConfig(seq_len=96, batch_size=1, prefetch=0, num_threads=1)
    for mode in ("keep", "mask", "drop"):
        b = next(iter(make_sft_eval_dataset([path], template, cfg, packing=False, trace=mode)))
        f = example_features(CONV, template, train_on_prompt=False, trace=mode)
        n = len(f["tokens"])
        np.testing.assert_array_equal(b["loss_mask"][0][:n], f["loss_mask"])
        np.testing.assert_array_equal(b["tokens"][0][:n], f["tokens"])
