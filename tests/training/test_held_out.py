"""Held-out batches are read once and replayed: `Replayed` and `make_totals`."""

import itertools

import numpy as np

from jaxllm.trainers.held_out import Replayed, make_totals


def stream(n: int, reads: list[int]):
    """`n` batches of 3 x 4 int32 values, counting each time the stream is read."""
    reads.append(1)
    for i in range(n):
        yield {"x": np.full((3, 4), i, np.int32)}


def test_a_finished_pass_is_replayed_and_a_large_or_unfinished_one_is_not():
    reads: list[int] = []
    kept = Replayed(lambda: stream(5, reads))
    first = [b["x"][0, 0] for b in kept]
    again = [b["x"][0, 0] for b in kept]
    assert first == again == [0, 1, 2, 3, 4] and len(reads) == 1
    # 5 batches of 48 bytes: a 200-byte limit keeps nothing, each pass reads the stream
    reads.clear()
    big = Replayed(lambda: stream(5, reads), limit=200)
    assert [len(list(big)) for _ in range(3)] == [5, 5, 5] and len(reads) == 3
    # a pass stopped early keeps nothing: the next one reads the whole stream
    reads.clear()
    cut = Replayed(lambda: stream(5, reads))
    assert len(list(itertools.islice(cut, 2))) == 2
    assert len(list(cut)) == 5 and len(list(cut)) == 5 and len(reads) == 2


def test_totals_read_the_stream_once_and_give_the_same_sums(monkeypatch):
    """Three evaluations of a changing state: the sums of each against numpy, one read."""
    from jaxllm.trainers import held_out

    monkeypatch.setattr(held_out, "to_global", lambda batch, mesh: batch)
    reads: list[int] = []

    def batches(num_batches):
        assert num_batches is None  # one process: no common count
        return stream(6, reads)

    step = lambda scale, batch: {"sum": scale * batch["x"].sum(), "n": batch["x"].size}  # noqa: E731
    totals = make_totals(step, batches, mesh=None, max_batches=4)  # the first 4 batches
    for scale in (1.0, 2.0, 0.5):
        out = totals(scale)
        assert out == {"sum": scale * 12 * (0 + 1 + 2 + 3), "n": 48.0}
    assert len(reads) == 1
