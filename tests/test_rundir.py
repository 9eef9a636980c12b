"""The run-directory contract: finished runs are kept, unfinished ones resume or refuse."""

import json

import pytest

from jaxllm.config import from_dict, replace
from jaxllm.errors import RunDirError
from jaxllm.main import main
from jaxllm.rundir import RunDir, atomic_write_json, first_difference, is_finished


def cfg_at(path, **kw):
    return from_dict({"stage": "data", "output_dir": str(path), **kw})


def test_finished_run_is_refused_then_replaced_with_overwrite(tmp_path):
    cfg = cfg_at(tmp_path / "r")
    rd = RunDir.open(cfg)
    (rd.path / "artifact.txt").write_text("x")
    rd.finish({"loss": 1.0})
    assert is_finished(rd.path)
    with pytest.raises(RunDirError, match="holds a finished run; set overwrite: true"):
        RunDir.open(cfg)
    assert (rd.path / "artifact.txt").exists()  # nothing was touched
    RunDir.open(replace(cfg, overwrite=True))
    assert not (rd.path / "artifact.txt").exists() and not is_finished(rd.path)


def test_unfinished_run_resumes_with_same_config_and_refuses_another(tmp_path):
    cfg = cfg_at(tmp_path / "r", seed=1)
    RunDir.open(cfg)
    (cfg.run_dir / "x.txt").write_text("an output")
    assert RunDir.open(replace(cfg, progress=False)).resumed  # progress may change
    assert RunDir.open(replace(cfg, **{"mesh.data": 2, "mesh.fsdp": 4})).resumed  # and the mesh
    with pytest.raises(
        RunDirError, match=r"an unfinished run with another config \(seed: 1 -> 2\)"
    ):
        RunDir.open(replace(cfg, seed=2))


def test_a_pipeline_reusing_a_finished_run_of_another_config_says_finished(tmp_path):
    from jaxllm.rundir import check_same_config

    cfg = cfg_at(tmp_path / "r", seed=1)
    RunDir.open(cfg).finish({"steps": 1})  # what `run_stage(reuse_finished=True)` checks
    with pytest.raises(RunDirError, match=r"holds a finished run with another config \(seed"):
        check_same_config(cfg.run_dir, replace(cfg, seed=7))


def test_a_run_that_wrote_only_its_config_starts_over_with_another(tmp_path):
    cfg = cfg_at(tmp_path / "r", seed=1)
    RunDir.open(cfg)  # e.g. stopped at once by a wrong input path: config.yaml alone
    assert not RunDir.open(replace(cfg, seed=2)).resumed
    assert "seed: 2" in (tmp_path / "r/config.yaml").read_text()


@pytest.mark.parametrize("kept", ["tokenizer.model", "tokenizer/tokenizer.json"])
def test_a_run_that_wrote_only_its_config_and_tokenizer_starts_over(tmp_path, kept):
    """A training stage keeps its tokenizer before it checks its inputs: a wrong data path
    leaves config.yaml and tokenizer.model (or tokenizer/), and the corrected command runs."""
    cfg = cfg_at(tmp_path / "r", seed=1)
    RunDir.open(cfg)
    (tmp_path / "r" / kept).parent.mkdir(exist_ok=True)
    (tmp_path / "r" / kept).write_text("tok")
    assert not RunDir.open(replace(cfg, seed=2)).resumed
    assert "seed: 2" in (tmp_path / "r/config.yaml").read_text()
    (tmp_path / "r/metrics.jsonl").write_text('{"step": 1}\n')  # it trained: refused again
    with pytest.raises(RunDirError, match=r"an unfinished run with another config \(seed"):
        RunDir.open(replace(cfg, seed=3))
    alone = tmp_path / "t"  # a tokenizer without a run's config.yaml is no run: refused
    alone.mkdir()
    (alone / "tokenizer.model").write_text("tok")
    with pytest.raises(RunDirError, match="holds no jaxllm run"):
        RunDir.open(cfg_at(alone))


def test_foreign_nonempty_directory_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="holds no jaxllm run"):
        RunDir.open(cfg_at(tmp_path / "r"))
    with pytest.raises(RunDirError, match="holds no jaxllm run"):  # overwrite replaces runs only
        RunDir.open(cfg_at(tmp_path / "r", overwrite=True))
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep me"
    (tmp_path / "r" / "summary.json").write_text("{}")  # another tool's summary: still no run
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="holds no jaxllm run"):
            RunDir.open(cfg_at(tmp_path / "r", overwrite=overwrite))
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep me"


def test_first_difference_reports_nested_key():
    assert first_difference({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == "a.b.1: 2 -> 3"
    assert first_difference({"a": 1, "overwrite": False}, {"a": 1, "overwrite": True}) is None


def test_atomic_json_leaves_no_temporaries(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"x": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_cli_reports_errors_on_one_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("stage: pretrian\n")
    assert main(["--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'stage': unknown stage 'pretrian'")
    assert "\n" not in err
    p.write_text("stage: data\ndata: {sources: [{path: a}], on_eror: fail}\n")
    assert main(["--config", str(p)]) == 2
    assert "did you mean 'data.on_error'" in capsys.readouterr().err


def test_run_dir_in_a_bucket(bucket):
    from jaxllm.training.metrics import MetricsWriter, plot_losses, read_metrics

    cfg = cfg_at("gs://bucket/run")
    assert str(cfg.run_dir) == "gs://bucket/run"
    rd = RunDir.open(cfg)
    writer = MetricsWriter(rd.path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 4.0 - step})
    writer.close()  # a bucket object is written whole
    assert [r["step"] for r in read_metrics(rd.path / "metrics.jsonl")] == [1, 2, 3]
    assert (
        MetricsWriter(rd.path, resume_step=2, tensorboard=False).lines[-1].startswith('{"step": 2')
    )  # a resumed run drops what came after its checkpoint
    assert plot_losses(rd.path / "metrics.jsonl", rd.path / "loss.png").name == "loss.png"
    rd.finish({"loss": 1.0})
    assert is_finished(cfg.run_dir)
    assert sorted(p.name for p in (bucket / "run").iterdir()) == [
        "config.yaml", "loss.png", "metrics.jsonl", "summary.json"
    ]  # fmt: skip
    with pytest.raises(RunDirError, match="gs://bucket/run holds a finished run"):
        RunDir.open(cfg)
    RunDir.open(replace(cfg, overwrite=True))
    assert sorted(p.name for p in (bucket / "run").iterdir()) == ["config.yaml"]


def test_a_key_added_since_the_run_was_written_is_no_difference_at_its_default():
    """A run written before jaxllm had a key resumes when the key keeps its default (the old
    run ran with that behaviour); another value is still a difference, also in pipelines."""
    defaults = {"sft": {"tasks": [], "packing": True}, "pipeline": [], "seed": 0}
    old = {"sft": {"packing": True}, "seed": 0}
    assert first_difference(old, {"sft": {"tasks": [], "packing": True}, "seed": 0},
                            defaults=defaults) is None  # fmt: skip
    assert first_difference(old, {"sft": {"tasks": ["service"], "packing": True}, "seed": 0},
                            defaults=defaults) == "sft.tasks: None -> ['service']"  # fmt: skip
    no_defaults = {"sft": {"tasks": [], "packing": True}, "seed": 0}
    assert first_difference(old, no_defaults) == "sft.tasks: None -> []"
    pipe_old = {"pipeline": [old], "seed": 0}
    pipe_new = {"pipeline": [{"sft": {"tasks": [], "packing": True}, "seed": 0}], "seed": 0}
    assert first_difference(pipe_old, pipe_new, defaults=defaults) is None
    pipe_new["pipeline"][0]["sft"]["tasks"] = ["math"]
    assert first_difference(pipe_old, pipe_new, defaults=defaults).startswith("pipeline.0.sft")
