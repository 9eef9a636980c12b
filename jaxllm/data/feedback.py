"""Binary feedback for KTO: answers marked good or bad, one row each.

Records (JSONL; the prompt side as in `data/preference.py`: `{"prompt", "system"?}` or
`{"messages": [...]}` ending with a user turn):

    unpaired  {"prompt", "completion": str, "label": true | false, "task"?}   (TRL's format)
    pairs, rankings — as `data/preference.py` reads them; each (better, worse) pair becomes
              two examples, the better answer desirable and the worse undesirable, both with
              the pair's weight (a ranked answer is desirable in the pairs it wins and
              undesirable in those it loses)

The formats mix freely, also within a file. Bad records fail when the files are opened,
naming file:line.

Batches hold B examples: `tokens, targets, loss_mask, segment_ids, positions` [B, L] (the
chat rendering of prompt + answer, the loss mask on the answer, its `<|end|>` and `</s>`),
`label` [B] (1 desirable, 0 undesirable), `weight` [B] (0 on padding rows) and `example` [B]
(the example's index in its `FeedbackRecords`, -1 on padding rows). An example cut before
any answer token carries no signal and is left out (`fit_examples` counts it).
"""

from __future__ import annotations

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
from jaxllm.data.preference import (
    _FORMATS,
    _answer_features,
    _answers,
    _check_answers,
    _check_task,
    _prompt_length,
    _prompt_messages,
    _record_pairs,
    pad_rows,
    record_error,
    select_view,
)
from jaxllm.data.sft import _padded_row
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import ChatTemplate, Message

FEEDBACK_FORMATS = '{"prompt", "completion", "label": true/false}, ' + _FORMATS


class FeedbackExample(NamedTuple):
    """One answer to a prompt, marked desirable or not, with its weight."""

    prompt: list[Message]
    completion: str
    label: bool
    weight: float
    task: str
    index: int  # in the FeedbackRecords


def _record_examples(record: dict[str, Any]) -> list[tuple[int, bool, float]]:
    """(answer, label, weight) of a record's examples, answer -1 for an unpaired record's
    completion, else an index into `preference._answers`; checks it all."""
    if "completion" not in record and "label" not in record:
        return [(i, label, w) for a, b, w in _record_pairs(record) for i, label in
                ((a, True), (b, False))]  # fmt: skip
    _prompt_messages(record, allow_answer=False)
    _check_task(record)
    extra = {"chosen", "rejected", "responses", "ranking"} & set(record)
    if extra:
        raise DataError(f'"{sorted(extra)[0]}" beside "completion" / "label": a record is a '
                        "pair, a ranking or one unpaired answer, not two of them")  # fmt: skip
    if not isinstance(record.get("completion"), str):
        raise DataError('expected a string "completion" beside "label"')
    if type(record.get("label")) is not bool:
        raise DataError(f'"label" must be true or false, got {str(record.get("label"))[:40]}')
    _check_answers([record["completion"]], ['"completion"'])
    return [(-1, record["label"], 1.0)]


class FeedbackRecords:
    """Random-access weighted examples of JSONL files in any of the formats above. Every record
    is read and checked once on opening (errors name file:line); the examples are an index
    (record, answer, label, weight) into the files. `select` keeps some, with their indices."""

    def __init__(self, paths: Sequence[str | Path], key: str = "") -> None:
        self.source = JsonlSource(paths)
        self.source.require_records(FEEDBACK_FORMATS, key)
        rows = []
        for r in range(len(self.source)):
            try:
                rows += [(r, *e) for e in _record_examples(self.source[r])]
            except DataError as e:
                raise record_error(self.source, r, str(e)) from None
        self._record = np.array([x[0] for x in rows], np.int64)
        self._answer = np.array([x[1] for x in rows], np.int32)
        self.labels = np.array([x[2] for x in rows], bool)
        self.weights = np.array([x[3] for x in rows], np.float32)
        self._ids = np.arange(len(rows), dtype=np.int64)
        self.total = len(rows)  # examples in the files, `select`ed or not
        self.unpaired = bool((self._answer < 0).any())  # any record of the unpaired format

    def select(self, keep: np.ndarray) -> FeedbackRecords:
        return select_view(self, keep, ("_record", "_answer", "labels", "weights", "_ids"))

    def __len__(self) -> int:
        return len(self._record)

    def __getitem__(self, index: int) -> FeedbackExample:
        index = int(index)
        record = self.source[int(self._record[index])]
        answer = int(self._answer[index])
        return FeedbackExample(
            prompt=_prompt_messages(record, allow_answer=False),
            completion=record["completion"] if answer < 0 else _answers(record)[answer],
            label=bool(self.labels[index]),
            weight=float(self.weights[index]),
            task=record.get("task", ""),
            index=int(self._ids[index]),
        )


def _features(example: FeedbackExample, template: ChatTemplate) -> dict[str, np.ndarray]:
    n_prompt = _prompt_length(example.prompt, template)
    return _answer_features(example.prompt, example.completion, template, n_prompt)


def example_row(example: FeedbackExample, template: ChatTemplate, seq_len: int) -> Batch:
    """One example as [L] arrays plus its scalar `label`, `weight` and `example` index."""
    out = {k: v.astype(np.int32) for k, v in _padded_row(_features(example, template),
                                                          seq_len).items()}  # fmt: skip
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    out["label"] = np.int32(example.label)
    out["weight"] = np.float32(example.weight)
    out["example"] = np.int32(example.index)
    return out


def open_examples(
    files: Sequence[Path], template: ChatTemplate, seq_len: int, key: str = ""
) -> tuple[FeedbackRecords, dict[str, int]]:
    """The examples of `files` with an answer token within `seq_len` (a `select` view) and the
    counts `examples`, `desirable`, `cut` (longer than seq_len: the answer's end lost) and
    `without_answer` (cut before any answer token: left out); refuses files without any."""
    records = FeedbackRecords(files, key)
    keep = np.ones(len(records), bool)
    cut = 0
    for i in range(len(records)):
        f = _features(records[i], template)
        cut += len(f["tokens"]) > seq_len
        keep[i] = bool(f["loss_mask"][:seq_len].any())
    fit = {"examples": len(records), "desirable": int(records.labels.sum()), "cut": cut,
           "without_answer": int((~keep).sum())}  # fmt: skip
    if len(records) and not keep.any():
        raise DataError(f"loader.seq_len {seq_len} cuts every example in {files[0]} before "
                        "its answer; raise it")  # fmt: skip
    return records.select(keep), fit


def make_feedback_dataset(
    records: FeedbackRecords, template: ChatTemplate, loader_cfg: LoaderConfig, *, seed: int,
    process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:  # fmt: skip
    """Training batches of this process: B = batch_size // process_count examples, shuffled,
    repeated."""
    examples = _share(records, process_index, process_count)
    if loader_cfg.shuffle:
        examples = examples.shuffle(seed=_grain_seed(seed))
    return _batches(examples.repeat(), template, loader_cfg, process_count)


def make_feedback_eval_dataset(
    records: FeedbackRecords, template: ChatTemplate, loader_cfg: LoaderConfig, *,
    process_index: int = 0, process_count: int = 1, num_batches: int | None = None,
) -> grain.IterDataset:  # fmt: skip
    """One pass in file order, the last batch padded with rows of weight 0; `num_batches`
    tops the stream up with all-padding batches (every process the same count)."""
    examples = _share(records, process_index, process_count)
    batches = _batches(examples, template, loader_cfg, process_count)
    if num_batches is not None:
        rows = local_batch_size(loader_cfg, process_count)
        batches = _PadBatchesIterDataset(batches, num_batches, _fill({}, rows, loader_cfg.seq_len))
    return batches


def _share(records: FeedbackRecords, process_index: int, process_count: int) -> grain.MapDataset:
    if len(records) < process_count:
        raise DataError(f"{len(records)} examples for {process_count} processes: each process "
                        "needs at least one")  # fmt: skip
    return grain.MapDataset.source(records)[process_index::process_count]


def _batches(examples: grain.MapDataset, template, cfg: LoaderConfig, process_count: int):
    rows, L = local_batch_size(cfg, process_count), cfg.seq_len
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=_DOC_PREFETCH)
    feats = examples.map(lambda e: example_row(e, template, L)).to_iter_dataset(read)
    batches = feats.batch(rows, drop_remainder=False).map(lambda b: _fill(b, rows, L))
    return finish_batches(batches, cfg)


def _fill(batch: Batch, rows: int, length: int) -> Batch:
    """Pads a short batch (or builds an empty one from {}) with zero rows of weight 0 and
    example -1."""
    return pad_rows(batch, rows, (length,), ("label", "weight", "example"))
