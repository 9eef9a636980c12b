"""Grain pipelines for supervised fine-tuning: chat records → batches shaped like pretraining's.

    JsonlSource ─► ds[process_index::process_count] ─► shuffle ─► repeat ─► render (template)
      ─► to_iter_dataset(read threads) ─► cut to L ─► best-fit pack or pad to L ─► batch(B)
      ─► prefetch

Batches have the keys of `data/pipeline.py` (`tokens, targets, segment_ids, positions,
loss_mask`), so the pretraining loss and step run unchanged. A conversation's ids become
`tokens = ids[:-1]`, `targets = ids[1:]`, and the template's role mask shifted the same way,
`loss_mask = mask[1:]`: a target counts when the token it predicts is one to learn (assistant
content, its `<|end|>`, the final `</s>`).

- `packing=True`: whole conversations share rows, placed by grain's BestFitPackIterDataset
  (`PACK_BINS` rows filled at once, each conversation into the row it fits most tightly, the
  rest of a row padded), each its own segment from position 0 (document masking), the mask a
  third feature packed in lock step. A conversation is never split over rows: every trained
  token sees its whole prompt in its own segment.
- `packing=False`: one conversation per row, right-padded.
Either way a conversation longer than L targets is cut to its first L (`length_census`
counts them). Padding has segment id 0 and loss mask 0. Iterator state is JSON data
(resumable mid-run, the packer's open rows included).

Reasoning traces (`trace=`): an assistant turn may hold `<think>…</think>` before its answer.
"keep" trains on trace and answer; "mask" keeps the trace in the input but gives its tokens
(both tags included) loss mask 0, so only the answer is learnt; "drop" removes the trace from
the text before rendering (the answers-only baseline). Only complete `<think>…</think>` pairs
inside one assistant turn count; a stray tag is left alone, as ordinary content.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import numpy as np

from jaxllm.config import LoaderConfig
from jaxllm.data.jsonl_source import JsonlSource
from jaxllm.data.pipeline import (
    _DOC_PREFETCH,
    Batch,
    _empty_batch,
    _grain_seed,
    _PadBatchesIterDataset,
    fill_rows,
    finish_batches,
    local_batch_size,
    packed_lm_batch,
)
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import (
    END_THINK,
    END_TOKEN,
    ROLE_TOKENS,
    THINK,
    ChatTemplate,
    RecordFormat,
    parse_record,
)

SFT_FORMATS = '{"prompt", "response", "system"?} or {"messages": [...]}'
PACK_BINS = 64  # rows best-fit packing fills at once (tiny_sft: 16 → 92.5 % full, 64 → 94.7 %)
TraceMode = Literal["keep", "mask", "drop"]
TRACE_MODES = ("keep", "mask", "drop")
_TRACE = re.compile(re.escape(THINK) + ".*?" + re.escape(END_THINK), re.DOTALL)


class SFTRecords:
    """Random-access conversations (lists of messages) of JSONL files; errors name file:line.

    `tasks` keeps only the records whose `"task"` is one of them (empty: all records). Files
    without a record are refused, naming the config `key` that names them when given."""

    def __init__(
        self, paths: Sequence[str | Path], fmt: RecordFormat = "auto", tasks: Sequence[str] = (),
        key: str = "",
    ) -> None:  # fmt: skip
        self.source = JsonlSource(paths)
        self.source.require_records(SFT_FORMATS, key)
        self.fmt = fmt
        self.index: np.ndarray | None = None
        if tasks:
            keep = [i for i in range(len(self.source)) if self.source[i].get("task") in tasks]
            if not keep:
                raise DataError(f'{paths[0]}: no record has a "task" in {list(tasks)} (sft.tasks)')
            self.index = np.asarray(keep, np.int64)

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    def _at(self, index: int) -> int:
        return int(index) if self.index is None else int(self.index[index])

    def __getitem__(self, index: int) -> list[dict[str, str]]:
        record = self.source[self._at(index)]
        try:
            return parse_record(record, "record", self.fmt)
        except DataError as e:
            what = str(e).removeprefix("record: ")
            raise self.source._error(*self._locate(self._at(index)), what) from None

    def record(self, index: int) -> dict[str, Any]:
        """The raw JSON object (extra keys such as "task" included)."""
        return self.source[self._at(index)]

    def _locate(self, index: int) -> tuple[int, int]:
        """(file index, byte offset) of a source record, for `JsonlSource._error`'s file:line."""
        src = self.source
        file_index = int(np.searchsorted(src._ends, index, side="right"))
        return file_index, int(src._starts[index])


def example_features(
    messages: list[dict[str, str]],
    template: ChatTemplate,
    train_on_prompt: bool,
    *,
    trace: TraceMode = "keep",
) -> dict[str, np.ndarray]:
    """One conversation as `tokens`, `targets` and `loss_mask` (int32), each of length n-1."""
    r = template.render(apply_trace(messages, trace), train_on_prompt=train_on_prompt)
    ids, mask = np.asarray(r.ids, np.int32), np.asarray(r.mask, np.int32)
    if trace == "mask":
        mask = mask * (1 - trace_spans(ids, template))
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def length_census(
    records: SFTRecords, template: ChatTemplate, seq_len: int, train_on_prompt: bool,
    trace: TraceMode = "keep",
) -> dict[str, int]:  # fmt: skip
    """How the conversations fit rows of `seq_len` targets (packed or not): `conversations`,
    `longer` (cut to their first `seq_len` targets) and `without_answer` (cut before any
    trained token: they train nothing). Renders every record once, so a malformed one raises
    its `DataError` (file:line) here, before training."""
    longer = empty = 0
    for i in range(len(records)):
        f = example_features(records[i], template, train_on_prompt, trace=trace)
        if len(f["tokens"]) > seq_len:
            longer += 1
            empty += not f["loss_mask"][:seq_len].any()
    return {"conversations": len(records), "longer": longer, "without_answer": empty}


def apply_trace(messages: list[dict[str, str]], mode: TraceMode) -> list[dict[str, str]]:
    """The text side of a trace mode: "drop" removes `<think>…</think>` from assistant turns.

    "keep" and "mask" return the messages unchanged (masking happens on the rendered ids).
    """
    check_trace_mode(mode)
    if mode != "drop":
        return messages
    return [
        {**m, "content": _TRACE.sub("", m["content"])} if m["role"] == "assistant" else m
        for m in messages
    ]


def trace_spans(ids: Sequence[int] | np.ndarray, template: ChatTemplate) -> np.ndarray:
    """0/1 per id: 1 on each `<think>…</think>` (tags included) inside an assistant turn.

    An assistant turn runs from `<|assistant|>` to its `<|end|>`; an opening tag with no
    closing tag before the turn ends marks nothing.
    """
    special = template.tok.special_ids
    if THINK not in special or END_THINK not in special:
        raise DataError(
            f'trace: "mask" needs {THINK} and {END_THINK} as special tokens of the tokenizer; '
            "train it with tokenizer.special_tokens including them (the default)"
        )
    think, end_think = special[THINK], special[END_THINK]
    assistant, end = template.ids[ROLE_TOKENS["assistant"]], template.ids[END_TOKEN]
    out = np.zeros(len(ids), np.int32)
    in_turn, start = False, None
    for i, t in enumerate(ids):
        if t == assistant:
            in_turn, start = True, None
        elif t == end:
            in_turn, start = False, None
        elif in_turn and t == think and start is None:
            start = i
        elif in_turn and t == end_think and start is not None:
            out[start : i + 1] = 1
            start = None
    return out


def check_trace_mode(mode: str) -> None:
    if mode not in TRACE_MODES:
        raise ValueError(f"trace: expected one of {', '.join(TRACE_MODES)}, got {mode!r}")


def make_sft_dataset(
    files: Sequence[Path],
    template: ChatTemplate,
    cfg: LoaderConfig,
    *,
    seed: int,
    fmt: RecordFormat = "auto",
    train_on_prompt: bool = False,
    packing: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    trace: TraceMode = "keep",
    tasks: Sequence[str] = (),
) -> grain.IterDataset:
    """Training batches of this process (B = batch_size // process_count rows of L)."""
    rows = local_batch_size(cfg, process_count)
    convs = _conversations(files, fmt, process_index, process_count, tasks)
    if cfg.shuffle:
        convs = convs.shuffle(seed=_grain_seed(seed))
    if repeat:
        convs = convs.repeat()
    return _batches(convs, template, cfg, rows, train_on_prompt, packing, trace)


def make_sft_eval_dataset(
    files: Sequence[Path],
    template: ChatTemplate,
    cfg: LoaderConfig,
    *,
    fmt: RecordFormat = "auto",
    train_on_prompt: bool = False,
    packing: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    trace: TraceMode = "keep",
    tasks: Sequence[str] = (),
) -> grain.IterDataset:
    """Validation batches: no shuffle, one pass, last batch padded (see `make_eval_dataset`)."""
    rows = local_batch_size(cfg, process_count)
    convs = _conversations(files, fmt, process_index, process_count, tasks)
    batches = _batches(convs, template, cfg, rows, train_on_prompt, packing, trace)
    if num_batches is not None:
        batches = _PadBatchesIterDataset(batches, num_batches, _empty_batch(rows, cfg.seq_len))
    return batches


def _conversations(
    files: Sequence[Path], fmt: RecordFormat, process_index: int, process_count: int,
    tasks: Sequence[str] = (),
) -> grain.MapDataset:  # fmt: skip
    if not files:
        raise DataError("no SFT files given; expected JSONL files of chat records")
    records = SFTRecords(files, fmt, tasks)
    if len(records) < process_count:
        raise DataError(
            f"{len(records)} SFT records in {files[0]} for {process_count} processes: each "
            "process needs at least one"
        )
    return grain.MapDataset.source(records)[process_index::process_count]


def _batches(
    convs: grain.MapDataset,
    template: ChatTemplate,
    cfg: LoaderConfig,
    rows: int,
    train_on_prompt: bool,
    packing: bool,
    trace: TraceMode = "keep",
) -> grain.IterDataset:
    """Render (in read threads), pack or pad to rows of L, batch, pad the last batch, prefetch."""
    L = cfg.seq_len
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=_DOC_PREFETCH)
    check_trace_mode(trace)
    feats = convs.map(lambda m: example_features(m, template, train_on_prompt, trace=trace))
    seqs = feats.to_iter_dataset(read)
    if packing:
        lengths = {"tokens": L, "targets": L, "loss_mask": L}
        seqs = grain.experimental.BestFitPackIterDataset(
            seqs.map(lambda x: {k: v[:L] for k, v in x.items()}), length_struct=lengths,
            num_packing_bins=max(rows, PACK_BINS), shuffle_bins=False,
        )  # fmt: skip
        batches = seqs.batch(rows, drop_remainder=False).map(lambda b: packed_lm_batch(b, rows))
    else:
        seqs = seqs.map(lambda x: _padded_row(x, L))
        batches = seqs.batch(rows, drop_remainder=False).map(lambda b: fill_rows(b, rows))
    return finish_batches(batches, cfg)


def _padded_row(x: dict[str, np.ndarray], length: int) -> Batch:
    """One conversation right-padded (or cut) to `length`, as segment 1 from position 0."""
    n = min(len(x["tokens"]), length)
    pad = length - n
    row = {k: np.pad(x[k][:n], (0, pad)) for k in ("tokens", "targets", "loss_mask")}
    row["segment_ids"] = np.pad(np.ones(n, np.int32), (0, pad))
    row["positions"] = np.pad(np.arange(n, dtype=np.int32), (0, pad))
    return row
