"""Preference data for reward models and DPO, and prompt lists for RL stages.

Records (JSONL, one object a line; the prompt side is `{"prompt": str}` with an optional
`"system": str`, or `{"messages": [...]}` ending with a user turn, as in `tokenizer/chat.py`):

    pairs     {"prompt", "chosen": str, "rejected": str, "task"?}
    rankings  {"prompt", "responses": [r0, ..., rK-1], "ranking": [best, ..., worst], "task"?}

A ranking of K answers becomes all K(K-1)/2 (better, worse) pairs, each weighted
1 / (K(K-1)/2), so every prompt weighs the same however many answers it ranks (InstructGPT);
a plain pair has weight 1. Bad records fail when the files are opened, naming file:line.

Batches (`make_preference_dataset`, `make_preference_eval_dataset`) hold B pairs:
`tokens, targets, loss_mask, segment_ids, positions` of shape [B, 2, L] (index 0 = chosen,
1 = rejected; each the chat rendering of prompt + answer, shifted as in `data/sft.py`, so the
loss mask covers the answer, its `<|end|>` and `</s>`), `weight` [B] (0 on padding rows) and
`pair` [B], the pair's index in its `PreferenceRecords` (-1 on padding rows: the key to
per-pair tables such as DPO's precomputed reference log-probs, and to the tasks).
A conversation longer than L+1 tokens is cut to L targets (the end of its answer is lost:
keep prompt + answer within the model's context instead); a pair cut to two identical rows
(the prompt, or the answers' common start, fills L) carries no signal and is left out of the
batches (`fit_pairs` counts both). int32 except loss_mask and weight.

`PromptRecords` + `prompt_rows` give RL stages the prompts ready for generation (any of the
formats above, SFT records, or `{"prompt", "answer"}` problems with a checkable answer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np

from jaxllm.config import LoaderConfig
from jaxllm.data.jsonl_source import JsonlSource
from jaxllm.data.pipeline import (
    _DOC_PREFETCH,
    Batch,
    _grain_seed,
    _PadBatchesIterDataset,
    finish_batches,
    local_batch_size,
)
from jaxllm.data.sft import _padded_row, example_features
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import (
    STRUCTURAL,
    ChatTemplate,
    Message,
    check_messages,
    split_answer,
)

PAIR_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_ROW = ("tokens", "targets", "loss_mask")  # what a row holds (the rest follows its length)
_FORMATS = '{"prompt", "chosen", "rejected"} or {"prompt", "responses", "ranking"}'
_PROMPTS = '{"prompt", "answer"?} or {"messages": [...]} (or SFT or preference records)'


class PreferencePair(NamedTuple):
    """One weighted comparison: the prompt's messages, a better and a worse answer."""

    prompt: list[Message]
    chosen: str
    rejected: str
    weight: float
    task: str
    index: int  # in the PreferenceRecords


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranking listed best first: K(K-1)/2 of them."""
    return [(a, b) for i, a in enumerate(ranking) for b in ranking[i + 1 :]]


class PreferenceRecords:
    """Random-access weighted pairs of preference JSONL files (both formats, mixed freely).

    Every record is read and checked once on opening (errors name file:line); the pairs are
    an index (record, better, worse, weight) into the files, read again on access. `select`
    gives a view of some of the pairs, each keeping its index (`PreferencePair.index`).
    """

    def __init__(self, paths: Sequence[str | Path], key: str = "") -> None:
        self.source = JsonlSource(paths)
        self.source.require_records(_FORMATS, key)  # `key`: the config key naming the files
        index = []
        for r in range(len(self.source)):
            record = self.source[r]
            try:
                pairs = _record_pairs(record)
            except DataError as e:
                raise record_error(self.source, r, str(e)) from None
            index += [(r, a, b, w) for a, b, w in pairs]
        self._record = np.array([p[0] for p in index], np.int64)
        self._better = np.array([p[1] for p in index], np.int32)
        self._worse = np.array([p[2] for p in index], np.int32)
        self.weights = np.array([p[3] for p in index], np.float32)
        self._ids = np.arange(len(index), dtype=np.int64)
        self.total = len(index)  # pairs in the files, `select`ed or not

    def select(self, keep: np.ndarray) -> PreferenceRecords:
        """The pairs where `keep` (bool per pair of this object) is true, indices kept."""
        return select_view(self, keep, ("_record", "_better", "_worse", "weights", "_ids"))

    def __len__(self) -> int:
        return len(self._record)

    def __getitem__(self, index: int) -> PreferencePair:
        index = int(index)
        record = self.source[int(self._record[index])]
        answers = _answers(record)
        return PreferencePair(
            prompt=_prompt_messages(record, allow_answer=False),
            chosen=answers[self._better[index]],
            rejected=answers[self._worse[index]],
            weight=float(self.weights[index]),
            task=record.get("task", ""),
            index=int(self._ids[index]),
        )


def select_view(records, keep: np.ndarray, arrays: tuple[str, ...]):
    """A shallow copy of `records` with each of its index `arrays` cut to `keep`."""
    view = copy.copy(records)
    for name in arrays:
        setattr(view, name, getattr(records, name)[keep])
    return view


def _answers(record: dict[str, Any]) -> list[str]:
    """The record's answers: [chosen, rejected] of a pair, or its responses."""
    if "responses" in record:
        return record["responses"]
    return [record["chosen"], record["rejected"]]


def _record_pairs(record: dict[str, Any]) -> list[tuple[int, int, float]]:
    """(better, worse, weight) triples of a record, indices into `_answers`; checks it all."""
    _prompt_messages(record, allow_answer=False)
    _check_task(record)
    has_pair = "chosen" in record or "rejected" in record
    has_ranking = "responses" in record or "ranking" in record
    if has_pair == has_ranking:
        hint = " (unpaired feedback trains with dpo.loss kto)" if "label" in record else ""
        raise DataError(f"expected {_FORMATS}, got keys {sorted(record)}{hint}")
    if has_pair:
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise DataError(f'expected a string "{key}" (records are {_FORMATS})')
        if record["chosen"] == record["rejected"]:
            raise DataError('"chosen" and "rejected" are the same text; a pair needs two answers')
        _check_answers([record["chosen"], record["rejected"]], ['"chosen"', '"rejected"'])
        return [(0, 1, 1.0)]
    responses, ranking = record.get("responses"), record.get("ranking")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError('expected "responses": a list of strings')
    k = len(responses)
    if k < 2:
        raise DataError(f'"responses" has {k} answer(s); a ranking needs at least 2')
    if len(set(responses)) < k:
        raise DataError('"responses" repeats an answer; each ranked answer must differ')
    _check_answers(responses, [f'"responses"[{i}]' for i in range(k)])
    is_int = isinstance(ranking, list) and all(type(i) is int for i in ranking)
    if not is_int or sorted(ranking) != list(range(k)):
        raise DataError(
            f'"ranking" must list the indices 0..{k - 1} of "responses", best first, each '
            f"once; got {str(ranking)[:60]}"
        )
    pairs = ranking_pairs(ranking)
    return [(a, b, 1.0 / len(pairs)) for a, b in pairs]


def _check_answers(answers: list[str], names: list[str]) -> None:
    """An answer is an assistant message's content: no reserved token strings (as
    `check_messages` checks every message), so a record fails here, not at render time."""
    for answer, name in zip(answers, names):
        bad = next((s for s in STRUCTURAL if s in answer), None)
        if bad:
            raise DataError(f"{name} contains the reserved token {bad}; remove it")


def _check_task(record: dict[str, Any]) -> None:
    if not isinstance(record.get("task", ""), str):
        raise DataError('"task" must be a string')


def _prompt_messages(record: dict[str, Any], allow_answer: bool) -> list[Message]:
    """The prompt side of a record, ending with a user turn (a trailing answer is split off
    when `allow_answer`, e.g. for an SFT conversation)."""
    if "messages" in record:
        messages = check_messages(record["messages"], "record", need_answer=False)
        if allow_answer:
            messages = split_answer(messages)[0]
    elif isinstance(record.get("prompt"), str):
        system = record.get("system")
        if "system" in record and not isinstance(system, str):
            raise DataError(f'"system" must be a string, got {type(system).__name__}')
        head = [{"role": "system", "content": system}] if "system" in record else []
        user = {"role": "user", "content": record["prompt"]}
        messages = check_messages([*head, user], "record", need_answer=False)
    else:
        raise DataError('expected a string "prompt" or a list "messages" for the prompt')
    if not messages or messages[-1]["role"] != "user":
        raise DataError('"messages" (the prompt) must end with a user turn')
    return messages


def record_error(source: JsonlSource, index: int, what: str) -> DataError:
    """`what` (a message from the checks above) as a DataError naming file:line."""
    what = what.removeprefix("record: ")
    file_index = int(np.searchsorted(source._ends, index, side="right"))
    return source._error(file_index, int(source._starts[index]), what)


# ----------------------------------------------------------------------------- batches


def pair_features(pair: PreferencePair, template: ChatTemplate, seq_len: int) -> Batch:
    """One pair as [2, L] arrays (chosen, rejected) plus its scalar `weight` and `pair`."""
    n_prompt = _prompt_length(pair.prompt, template)
    rows = [
        _padded_row(_answer_features(pair.prompt, a, template, n_prompt), seq_len)
        for a in (pair.chosen, pair.rejected)
    ]
    out = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in PAIR_KEYS}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    out["weight"] = np.float32(pair.weight)
    out["pair"] = np.int32(pair.index)
    return out


def _prompt_length(prompt: list[Message], template: ChatTemplate) -> int:
    return len(template.render(prompt, add_generation_prompt=True).ids)


def _answer_features(
    prompt: list[Message], answer: str, template: ChatTemplate, n_prompt: int
) -> dict[str, np.ndarray]:
    """prompt + answer as uncut `tokens, targets, loss_mask`. Only the answer is learnt and
    scored: an assistant turn inside a multi-turn prompt is context (`render` would mark it,
    as SFT wants), so the prompt's targets are masked out."""
    conv = [*prompt, {"role": "assistant", "content": answer}]
    feats = example_features(conv, template, train_on_prompt=False)
    feats["loss_mask"][: n_prompt - 1] = 0
    return feats


def fit_pairs(
    records: PreferenceRecords, template: ChatTemplate, seq_len: int
) -> tuple[np.ndarray, dict[str, int]]:
    """How the pairs fit rows of `seq_len` targets: `(keep, fit)`, `keep` a bool per pair
    (false: cut to two identical rows, no signal) and `fit` the counts `pairs`, `cut` (a
    side longer than seq_len, cut: its end, `<|end|>`, `</s>`, is lost and a reward is read
    mid-answer), `identical` (cut to two identical rows: dropped) and `without_answer` (cut
    before any answer token; identical too). Renders each answer once."""
    keep = np.ones(len(records), bool)
    cut = identical = empty = 0
    rows: dict[int, list] = {}  # the current record's answers (pairs come in record order)
    for i in range(len(records)):
        r = int(records._record[i])
        if r not in rows:
            record = records.source[r]
            prompt = _prompt_messages(record, allow_answer=False)
            n_prompt = _prompt_length(prompt, template)
            feats = [_answer_features(prompt, a, template, n_prompt) for a in _answers(record)]
            # (cut?, the row's contents as bytes: equal iff the rows are, any answer token?)
            rows = {r: [(len(f["tokens"]) > seq_len,
                         b"".join(f[k][:seq_len].astype(np.int32).tobytes() for k in _ROW),
                         bool(f["loss_mask"][:seq_len].any())) for f in feats]}  # fmt: skip
        a, b = rows[r][records._better[i]], rows[r][records._worse[i]]
        cut += a[0] or b[0]
        if a[1] == b[1]:
            identical += 1
            keep[i] = False
        empty += not (a[2] and b[2])
    fit = {"pairs": len(records), "cut": cut, "identical": identical, "without_answer": empty}
    return keep, fit


def make_preference_dataset(
    files: Sequence[Path],
    template: ChatTemplate,
    loader_cfg: LoaderConfig,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    records: PreferenceRecords | None = None,
) -> grain.IterDataset:
    """Training batches of this process: B = batch_size // process_count pairs, shuffled;
    the pairs of `open_pairs(files)`, or `records` (its result, reused)."""
    rows = local_batch_size(loader_cfg, process_count)
    pairs = _pairs(files, template, loader_cfg.seq_len, process_index, process_count, records)
    if loader_cfg.shuffle:
        pairs = pairs.shuffle(seed=_grain_seed(seed))
    if repeat:
        pairs = pairs.repeat()
    return _batches(pairs, template, loader_cfg, rows)


def make_preference_eval_dataset(
    files: Sequence[Path],
    template: ChatTemplate,
    loader_cfg: LoaderConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    records: PreferenceRecords | None = None,
) -> grain.IterDataset:
    """One pass in file order (of `open_pairs(files)`, or `records`); the last batch is
    padded with zero rows of weight 0.

    `num_batches` tops the stream up with all-padding batches, as in `make_eval_dataset`.
    """
    rows = local_batch_size(loader_cfg, process_count)
    pairs = _pairs(files, template, loader_cfg.seq_len, process_index, process_count, records)
    batches = _batches(pairs, template, loader_cfg, rows)
    if num_batches is not None:
        empty = _fill_rows({}, rows, loader_cfg.seq_len)
        batches = _PadBatchesIterDataset(batches, num_batches, empty)
    return batches


def open_pairs(
    files: Sequence[Path], template: ChatTemplate, seq_len: int
) -> tuple[PreferenceRecords, dict[str, int]]:
    """The pairs of `files` that do not cut to two identical rows at `seq_len` (a `select`
    view) and `fit_pairs`'s counts; refuses files whose every pair does."""
    records = PreferenceRecords(files)
    keep, fit = fit_pairs(records, template, seq_len)
    if fit["pairs"] and not keep.any():
        raise DataError(
            f"loader.seq_len {seq_len} cuts every pair in {files[0]} to two identical rows "
            "(the prompt or the answers' common start fills it); raise it"
        )
    return records.select(keep), fit


def _pairs(
    files: Sequence[Path], template: ChatTemplate, seq_len: int, process_index: int,
    process_count: int, records: PreferenceRecords | None,
) -> grain.MapDataset:  # fmt: skip
    """This process's share of the pairs (`records`, else `open_pairs(files)`)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if not files:
        raise DataError(f"no preference files given; expected JSONL files of {_FORMATS}")
    if records is None:
        records = open_pairs(files, template, seq_len)[0]
    if len(records) < process_count:
        raise DataError(
            f"{len(records)} preference pairs in {files[0]} for {process_count} processes: "
            "each process needs at least one"
        )
    return grain.MapDataset.source(records)[process_index::process_count]


def _batches(
    pairs: grain.MapDataset, template: ChatTemplate, cfg: LoaderConfig, rows: int
) -> grain.IterDataset:
    """Render (in read threads), batch, pad the last batch, prefetch; JSON iterator state."""
    L = cfg.seq_len
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=_DOC_PREFETCH)
    feats = pairs.map(lambda p: pair_features(p, template, L)).to_iter_dataset(read)
    batches = feats.batch(rows, drop_remainder=False).map(lambda b: _fill_rows(b, rows, L))
    return finish_batches(batches, cfg)


def _fill_rows(batch: Batch, rows: int, length: int) -> Batch:
    """Pads a short batch (or builds an empty one from {}) with zero rows of weight 0
    (and pair -1)."""
    return pad_rows(batch, rows, (2, length), ("weight", "pair"))


def pad_rows(batch: Batch, rows: int, row_shape: tuple, scalars: tuple[str, ...]) -> Batch:
    """`batch` (or {}) topped up to `rows` with zero rows: `PAIR_KEYS` of `row_shape` each,
    `scalars` one value a row (0, and -1 for the index: the last of `scalars`)."""
    have = len(batch["weight"]) if batch else 0
    out = {}
    for k in (*PAIR_KEYS, *scalars):
        dtype = np.float32 if k in ("loss_mask", "weight") else np.int32
        shape = (rows - have,) if k in scalars else (rows - have, *row_shape)
        pad = np.full(shape, -1 if k == scalars[-1] else 0, dtype)
        out[k] = np.concatenate([np.asarray(batch[k], dtype), pad]) if have else pad
    return out


# ----------------------------------------------------------------------------- RL prompts


class PromptRecords:
    """Random-access prompts of JSONL files in any format above, SFT records included, or
    `{"prompt", "answer"}`: dicts of `messages` (ending with a user turn), `answer` (str or
    None), `task` and, when the record has one, `chosen` (a pair's, or a ranking's best)."""

    def __init__(self, paths: Sequence[str | Path], key: str = "") -> None:
        self.source = JsonlSource(paths)
        self.source.require_records(_PROMPTS, key)  # `key`: the config key naming the files

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        try:
            return _prompt_record(record)
        except DataError as e:
            raise record_error(self.source, int(index), str(e)) from None


def _prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    _check_task(record)
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f'"answer" must be a string, got {str(answer)[:40]}')
    out = {
        "messages": _prompt_messages(record, allow_answer=True),
        "answer": answer,
        "task": record.get("task", ""),
    }
    if "chosen" in record or "ranking" in record:
        better = _record_pairs(record)[0][0]
        out["chosen"] = _answers(record)[better]
    return out


def prompt_rows(records: PromptRecords, template: ChatTemplate) -> list[dict[str, Any]]:
    """Every record as `ids` (the rendered prompt ending with `<|assistant|>`), `prompt`
    (the last user turn's text, for display), `answer`, `task` and `chosen` when present:
    the inputs of generation for RL stages."""
    rows = []
    for i in range(len(records)):
        r = records[i]
        row = {k: v for k, v in r.items() if k != "messages"}
        row["ids"] = template.render(r["messages"], add_generation_prompt=True).ids
        row["prompt"] = r["messages"][-1]["content"]
        rows.append(row)
    return rows
