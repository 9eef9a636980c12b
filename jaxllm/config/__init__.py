"""One typed config tree: YAML → frozen dataclasses, with `--set a.b=v` overrides.

`Config` is the root; each stage reads its sections. Loading is strict (see `load.py`): an
unknown key fails with its dotted path and the closest valid key, a wrong type names the key,
the expected type and the value given.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxllm.config.alignment import DPOConfig, RewardConfig
from jaxllm.config.data import (
    CHAT_TOKENS,
    DataConfig,
    DedupConfig,
    FilterConfig,
    LoaderConfig,
    SourceConfig,
    TokenizerConfig,
)
from jaxllm.config.distill import DistillConfig
from jaxllm.config.encoder import ClassifyConfig, MLMConfig
from jaxllm.config.eval import ChatConfig, EvalConfig, EvalModelConfig
from jaxllm.config.interop import EmbedConfig, HFConfig, ScoreConfig
from jaxllm.config.load import (
    _bad,
    _convert,
    dump_yaml,
    is_remote,
    key_type,
    parse_set_value,
    read_yaml,
    replace,
    resolve_path,
    set_dotted,
    storage_path,
    to_dict,
)
from jaxllm.config.model import (
    EarlyStoppingConfig,
    GenerateConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RopeScalingConfig,
    TrainConfig,
)
from jaxllm.config.peft import PeftConfig
from jaxllm.config.quant import QuantizeConfig
from jaxllm.config.rl import GRPOConfig, PPOConfig
from jaxllm.config.scaling import ScalingConfig
from jaxllm.config.serve import ServeConfig
from jaxllm.config.sft import SFTConfig
from jaxllm.errors import ConfigError

__all__ = [
    "CHAT_TOKENS",
    "ClassifyConfig",
    "ChatConfig",
    "Config",
    "DPOConfig",
    "DataConfig",
    "DedupConfig",
    "DistillConfig",
    "EmbedConfig",
    "EvalConfig",
    "EvalModelConfig",
    "FilterConfig",
    "GRPOConfig",
    "EarlyStoppingConfig",
    "GenerateConfig",
    "HFConfig",
    "InputsConfig",
    "LoaderConfig",
    "MLMConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "PeftConfig",
    "QuantizeConfig",
    "RewardConfig",
    "RopeScalingConfig",
    "SFTConfig",
    "ScoreConfig",
    "ServeConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainConfig",
    "dump_yaml",
    "from_dict",
    "is_remote",
    "load_config",
    "read_yaml",
    "replace",
    "resolve_path",
    "set_dotted",
    "storage_path",
    "to_dict",
]


def _home(path: Any) -> Any:
    """`~/x` (a path as a config writes it) with the home directory put in."""
    return os.path.expanduser(path) if isinstance(path, str) else path


@dataclass(frozen=True)
class InputsConfig:
    """What a stage reads from earlier stages; `stage: pipeline` fills the empty ones."""

    data_dir: str = ""  # a `stage: data` output directory (train/ and val/ shards)
    tokenizer: str = ""  # a sentencepiece .model file, or a tokenizer.json (dir)
    checkpoint: str = ""  # a checkpoint directory
    reward_checkpoint: str = ""  # a `stage: reward` checkpoint (ppo `reward: model`, grpo `model`)
    sft_data: str = ""  # SFT records (e.g. teacher answers); when set, sft trains on it
    sft_val_data: str = ""  # held-out SFT records; when set, sft scores on it

    def __post_init__(self) -> None:  # `~/x` means the home directory, as in data paths
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _home(getattr(self, f.name)))


@dataclass(frozen=True)
class Config:
    """The whole run. `stage` picks what runs; sections a stage does not use are ignored."""

    stage: str
    name: str = ""  # defaults to the config file's name
    output_dir: str = ""  # defaults to runs/<name>
    seed: int = 0
    overwrite: bool = False  # allow replacing a finished run's directory
    progress: bool = True  # progress bars on stderr
    distributed: bool = False  # multi-host: jax.distributed.initialize() (TPU pods, SLURM, ...)
    # jax's persistent compilation cache: compiled programs go to this directory and a later
    # run of the same programs (same shapes, jax version and devices) loads them instead of
    # compiling; empty: off. Read from the config given on the command line.
    compile_cache: str = ""
    inputs: InputsConfig = field(default_factory=InputsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    hf: HFConfig = field(default_factory=HFConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # `stage: pipeline`: each entry is a config path, or a mapping with an optional `config:`
    # path plus keys that override it (dotted keys allowed); inlined when the file is loaded.
    pipeline: tuple[Config, ...] = ()

    def __post_init__(self) -> None:  # `~/x` means the home directory, as in data paths
        object.__setattr__(self, "output_dir", _home(self.output_dir))

    def _validate(self) -> None:
        if not 0 <= self.seed < 2**63:  # numpy's and jax's seeds: non-negative, 64-bit
            raise ValueError(f"seed: must be in [0, 2**63), got {self.seed}")

    @property
    def run_dir(self) -> Path:
        """The run directory: a local `Path`, or an `epath.Path` for a bucket (`gs://...`)."""
        return storage_path(self.output_dir or f"runs/{self.name or self.stage}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML config, applies `a.b=value` overrides, returns the validated tree.

    A pipeline's entries are inlined here, so the resolved config is self-contained and every
    stage's keys are checked before anything runs (the stage names by `trainers.run_stage`,
    before the first stage starts). On a pipeline, an override of a stage's
    section (`train.steps=5`) or of `seed` / `progress` reaches every stage, over the stage's
    own value; `pipeline.<i>.key=v` sets one stage's key.
    """
    raw = read_yaml(path)
    raw.setdefault("name", _stem(path))
    sets = [_parse_set(item) for item in overrides]
    late = [(k, v) for k, v in sets if k.split(".")[0] == "pipeline"]
    early = [(k, v) for k, v in sets if k.split(".")[0] != "pipeline"]
    stage = next((v for k, v in reversed(early) if k == "stage"), raw.get("stage"))
    to_stages: list[tuple[str, Any]] = []
    if stage == "pipeline":
        early, to_stages = _split_pipeline_sets(early)
    for key, value in early:
        set_dotted(raw, key, value)
    if raw.get("stage") == "pipeline":
        reached: set[str] = set()
        raw["pipeline"] = _expand_pipeline(raw, Path(path).parent, sets=to_stages, reached=reached)
        for key, _ in to_stages:
            if key not in reached:
                raise ConfigError(
                    f"--set {key}: no stage of this pipeline has that list item; "
                    f"set it on one stage: --set pipeline.<i>.{key}=... (i from 0)"
                )
    for key, value in late:
        set_dotted(raw, key, value)
    cfg = from_dict(raw)
    _refuse_dead_keys(cfg)
    return cfg


def _refuse_dead_keys(cfg: Config, prefix: str = "") -> None:
    """Keys kept only so that older run configs (checkpoint metadata, every key dumped) still
    load: a config a user writes must not set them, as they would do nothing."""
    if cfg.tokenizer.path:
        raise ConfigError(
            f"config key '{prefix}tokenizer.path': has no effect; a stage takes its tokenizer "
            "from inputs.tokenizer (or its input checkpoint's), stage: tokenizer trains one "
            "into its run directory"
        )
    for i, sub in enumerate(cfg.pipeline):
        _refuse_dead_keys(sub, f"{prefix}pipeline.{i}.")


# keys of a pipeline itself; `seed` and `progress` are the pipeline's and every stage's
_PIPELINE_KEYS = {"stage", "name", "output_dir", "overwrite", "distributed", "compile_cache"}
_SHARED_KEYS = {"seed", "progress"}


def _split_pipeline_sets(sets: list[tuple[str, Any]]) -> tuple[list, list]:
    """A pipeline's top-level overrides: (the pipeline's own, those for every stage)."""
    own, to_stages = [], []
    for key, value in sets:
        head = key.split(".")[0]
        if head == "inputs":
            raise ConfigError(
                f"--set {key}: a pipeline hands each stage the outputs of the ones before; "
                f"set one stage's input instead: --set pipeline.<i>.{key}=... (i from 0)"
            )
        if head in _PIPELINE_KEYS or head in _SHARED_KEYS or key_type(Config, key) is None:
            own.append((key, value))  # an unknown key fails on the pipeline, with a hint
        if head not in _PIPELINE_KEYS and key_type(Config, key) is not None:
            to_stages.append((key, value))
    return own, to_stages


def _stem(path: str | Path) -> str:
    return Path(path).name.removesuffix(".yaml").removesuffix(".yml")


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. loader.seq_len=128")
    return key, parse_set_value(key, value, key_type(Config, key))


def _set_in_stage(sub: dict[str, Any], key: str, value: Any, reached: set[str]) -> None:
    """A pipeline-wide override on one stage: skipped where a list item it names (e.g.
    `data.sources.0.path`) is not in that stage."""
    parts = key.split(".")
    node: Any = sub
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            if any(p.isdigit() for p in parts[i + 1 :]):
                return
            break
    set_dotted(sub, key, value)
    reached.add(key)


def _expand_pipeline(
    raw: dict[str, Any],
    base_dir: Path,
    depth: int = 0,
    sets: typing.Sequence[tuple[str, Any]] = (),
    reached: set[str] | None = None,
) -> list[dict]:
    """Turns each entry (a config path, or {config: path, key: override...}) into a full config.

    Sub-stages inherit the pipeline file's seed and progress unless they set their own, and
    write into `<pipeline run dir>/<i>-<name>`. `sets` (command-line overrides) then go to
    every stage, nested pipelines' stages included, over the stage's own values.
    """
    reached = set() if reached is None else reached
    if depth > 4:
        raise ConfigError("pipeline: configs include each other too deeply (a cycle?)")
    entries = raw.get("pipeline") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError("config key 'pipeline': expected a non-empty list of stage configs")
    pipe_dir = raw.get("output_dir") or f"runs/{raw['name']}"
    out = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str):
            entry = {"config": entry}
        if not isinstance(entry, dict):
            raise _bad(f"pipeline.{i - 1}", dict, entry)
        entry = dict(entry)
        include = entry.pop("config", None)
        sub: dict[str, Any] = {}
        if include is not None:
            inc = _find_include(str(include), base_dir, i)
            sub = read_yaml(inc)
            sub.setdefault("name", _stem(inc))
            if sub.get("stage") == "pipeline":
                sub.setdefault("output_dir", f"{pipe_dir}/{i}-{sub['name']}")
                for key in _SHARED_KEYS:  # before its own stages inherit them
                    if key in entry:
                        sub[key] = entry[key]
                    elif key in raw:
                        sub.setdefault(key, raw[key])
                sub["pipeline"] = _expand_pipeline(sub, inc.parent, depth + 1, sets, reached)
        for key, value in entry.items():
            set_dotted(sub, str(key), value, where=f"pipeline.{i - 1}:")
        sub.setdefault("name", str(sub.get("stage", f"stage{i}")))
        sub.setdefault("output_dir", f"{pipe_dir}/{i}-{sub['name']}")
        for key in ("seed", "progress"):
            if key in raw:
                sub.setdefault(key, raw[key])
        for key, value in sets:
            if sub.get("stage") != "pipeline" or key.split(".")[0] in _SHARED_KEYS:
                _set_in_stage(sub, key, value, reached)
        out.append(sub)
    return out


def _find_include(name: str, base_dir: Path, i: int) -> Path:
    for cand in (Path(name), base_dir / name):
        if cand.is_file():
            return cand
    raise ConfigError(
        f"pipeline entry {i}: config file '{name}' not found (looked in . and {base_dir})"
    )


def from_dict(raw: dict[str, Any]) -> Config:
    """Builds a `Config` from plain data (as YAML gives it), checking every key and type."""
    if "stage" not in raw:
        raise ConfigError("config key 'stage' is missing: say which stage runs, e.g. stage: data")
    return _convert(Config, raw, "")
