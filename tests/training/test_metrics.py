"""Run metrics: JSONL rows (truncated on resume), TensorBoard scalars read back from the event
file, and a writer that does not pull torch in."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.training.metrics import MetricsWriter, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under `log_dir`, read with the TFRecord framing by hand
    (u64 length, u32 crc, payload, u32 crc) and tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_rows_scalars_and_resume_truncation(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "lr": 0.5, "note": "text", "bad": float("nan")})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] == pytest.approx(1 / 3) and rows[0]["note"] == "text"
    tb = tb_scalars(tmp_path / "tensorboard")
    assert sorted(tb) == ["loss", "lr"]  # strings and non-finite values are not scalars
    assert [s for s, _ in tb["loss"]] == [1, 2, 3]
    assert [v for _, v in tb["loss"]] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-5)  # float32

    # A run resumed from step 2 drops step 3's row before writing its own.
    w = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)
    w.write(3, {"loss": 9.0})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 9.0)]


def test_writer_does_not_import_torch(tmp_path):
    pytest.importorskip("torch")  # the dev extra installs it; the check needs it present
    code = (
        "import sys\n"
        "from jaxllm.training.metrics import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"  # and it still imports normally afterwards
        "print(torch.ones(2).sum().item())\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2.0"
    assert tb_scalars(tmp_path / "tensorboard")["loss"] == [(1, 2.0)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
