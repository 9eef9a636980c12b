"""The command line's `--set`: text keys keep their text, YAML errors are one line, a
pipeline's overrides reach its stages, and `~` means the home directory."""

import pytest
import yaml

from jaxllm.config import load_config
from jaxllm.errors import ConfigError


def write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture
def data_yaml(tmp_path):
    raw = {"stage": "data", "data": {"sources": [{"path": "a"}]}, "generate": {"prompts": ["p"]}}
    return write(tmp_path / "d.yaml", raw)


@pytest.mark.parametrize(
    ("item", "where", "expect"),
    [
        ("data.sources.0.path=*.jsonl", ("data", "sources", 0, "path"), "*.jsonl"),
        ("chat.system=[draft] be brief", ("chat", "system"), "[draft] be brief"),
        ("chat.system=@user says hi", ("chat", "system"), "@user says hi"),
        ("chat.system=`ls` and %run", ("chat", "system"), "`ls` and %run"),
        ("chat.system=Rules: be brief", ("chat", "system"), "Rules: be brief"),
        ("chat.system=yes", ("chat", "system"), "yes"),
        ("chat.system=a # b", ("chat", "system"), "a # b"),
        ("chat.system='quoted: ok'", ("chat", "system"), "quoted: ok"),
        ("name=123", ("name",), "123"),
        ("inputs.checkpoint=", ("inputs", "checkpoint"), ""),
        ("chat.prompt=''", ("chat", "prompt"), ""),
        ("model.norm=rmsnorm", ("model", "norm"), "rmsnorm"),
        # keys of other types still parse as YAML
        ("seed=7", ("seed",), 7),
        ("overwrite=true", ("overwrite",), True),
        ("data.sources.0.weight=0.5", ("data", "sources", 0, "weight"), 0.5),
        ("data.filters.scripts=[latin, han]", ("data", "filters", "scripts"), ("latin", "han")),
        ("generate.prompts.0=[x]: y", ("generate", "prompts", 0), "[x]: y"),
    ],
)
def test_set_text_keys_keep_the_text_as_written(data_yaml, item, where, expect):
    node = load_config(data_yaml, [item])
    for part in where:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    assert node == expect and type(node) is type(expect)


@pytest.mark.parametrize(
    ("item", "key"),
    [("data.filters.scripts=[latin", "data.filters.scripts"), ("train.steps=@5", "train.steps")],
)
def test_set_value_yaml_cannot_read_is_a_one_line_error(data_yaml, item, key):
    with pytest.raises(ConfigError) as e:
        load_config(data_yaml, [item])
    msg = str(e.value)
    assert msg.startswith(f"--set {key}: ") and "not valid YAML" in msg and "\n" not in msg


def test_set_unknown_key_with_unreadable_value_names_the_key(data_yaml):
    with pytest.raises(ConfigError, match="unknown config key 'chat.sytem': did you mean"):
        load_config(data_yaml, ["chat.sytem=[draft"])


@pytest.fixture
def pipe(tmp_path):
    write(tmp_path / "a.yaml", {"stage": "data", "seed": 5, "data": {"sources": [{"path": "x"}]}})
    write(tmp_path / "b.yaml", {"stage": "pretrain", "train": {"steps": 9}})
    write(tmp_path / "inner.yaml", {"stage": "pipeline", "pipeline": ["b.yaml"]})
    write(tmp_path / "i2.yaml", {"stage": "pipeline", "seed": 4, "pipeline": ["b.yaml"]})
    return write(
        tmp_path / "p.yaml",
        {
            "stage": "pipeline",
            "seed": 3,
            "output_dir": str(tmp_path / "out"),
            "pipeline": ["a.yaml", {"config": "b.yaml", "train.steps": 8}, "inner.yaml", "i2.yaml"],
        },
    )


def _stages(cfg):
    a, b, inner, _ = cfg.pipeline
    return a, b, inner.pipeline[0]


def test_pipeline_without_set_keeps_each_stage_file_values(pipe):
    a, b, c = _stages(load_config(pipe))
    assert (a.seed, b.seed, c.seed) == (5, 3, 3)  # a stage's own seed wins over the file's
    assert load_config(pipe).pipeline[3].pipeline[0].seed == 4  # a nested pipeline's own
    pipe.write_text(pipe.read_text().replace("- i2.yaml", "- {config: i2.yaml, seed: 6}"))
    assert load_config(pipe).pipeline[3].pipeline[0].seed == 6  # the entry's, over both
    assert (a.train.steps, b.train.steps, c.train.steps) == (1000, 8, 9)


def test_pipeline_set_reaches_every_stage_over_its_own_value(pipe, tmp_path):
    cfg = load_config(pipe, ["seed=7", "train.steps=2", "pipeline.1.train.steps=4"])
    a, b, c = _stages(cfg)
    assert (cfg.seed, a.seed, b.seed, c.seed, cfg.pipeline[3].pipeline[0].seed) == (7,) * 5
    assert (a.train.steps, b.train.steps, c.train.steps) == (2, 4, 2)  # pipeline.<i> wins
    cfg = load_config(pipe, ["data.sources.0.path=y", f"output_dir={tmp_path / 'o2'}"])
    a, b, c = _stages(cfg)
    assert [s.path for s in a.data.sources] == ["y"] and b.data.sources == c.data.sources == ()
    assert b.run_dir == tmp_path / "o2" / "2-b"
    with pytest.raises(ConfigError, match=r"--set data.sources.3.path: no stage .*pipeline.<i>"):
        load_config(pipe, ["data.sources.3.path=y"])
    with pytest.raises(ConfigError, match=r"--set inputs.checkpoint: .*pipeline.<i>.inputs"):
        load_config(pipe, ["inputs.checkpoint=ck"])
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz': did you mean"):
        load_config(pipe, ["train.stepz=2"])


def test_tilde_in_output_dir_and_inputs_is_the_home_directory(tmp_path, monkeypatch):
    from jaxllm.trainers import require_input

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ck").mkdir()
    p = write(
        tmp_path / "c.yaml",
        {"stage": "chat", "output_dir": "~/out", "inputs": {"checkpoint": "~/ck"}},
    )
    cfg = load_config(p, ["inputs.tokenizer=~/t.model"])
    assert cfg.output_dir == str(tmp_path / "out") and cfg.run_dir == tmp_path / "out"
    assert cfg.inputs.tokenizer == str(tmp_path / "t.model")
    assert require_input(cfg, "checkpoint") == tmp_path / "ck"
    write(tmp_path / "s.yaml", {"stage": "chat"})
    p = write(
        tmp_path / "p.yaml", {"stage": "pipeline", "output_dir": "~/p", "pipeline": ["s.yaml"]}
    )
    assert load_config(p).pipeline[0].run_dir == tmp_path / "p" / "1-s"


def test_pipeline_stage_typo_fails_before_the_first_stage_runs(tmp_path, capsys):
    from jaxllm.main import main

    (tmp_path / "docs.jsonl").write_text('{"text": "one document"}\n')
    data = {"stage": "data", "data": {"sources": [{"path": str(tmp_path / "docs.jsonl")}]}}
    write(tmp_path / "d.yaml", data)
    out = tmp_path / "out"
    p = write(
        tmp_path / "p.yaml",
        {
            "stage": "pipeline",
            "output_dir": str(out),
            "progress": False,
            "pipeline": ["d.yaml", {"config": "d.yaml", "stage": "genrate"}],
        },
    )
    assert main(["--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'pipeline.1.stage': unknown stage 'genrate'; ")
    assert "did you mean 'generate'?" in err and err.count("\n") == 1
    assert not out.exists()  # stage 1 (data) wrote nothing: it never started


def test_nested_pipeline_stage_typo_names_its_path(tmp_path):
    from jaxllm.trainers import check_stages

    write(tmp_path / "a.yaml", {"stage": "data"})
    write(tmp_path / "inner.yaml", {"stage": "pipeline", "pipeline": ["a.yaml", "a.yaml"]})
    p = write(tmp_path / "p.yaml", {"stage": "pipeline", "pipeline": ["a.yaml", "inner.yaml"]})
    check_stages(load_config(p))  # every stage known: nothing raised
    with pytest.raises(ConfigError, match=r"^config key 'pipeline.1.pipeline.0.stage': unknown"):
        check_stages(load_config(p, ["pipeline.1.pipeline.0.stage=dta"]))
