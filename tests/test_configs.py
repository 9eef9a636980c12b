"""Every shipped config loads and validates (DESIGN: one test loads every file in configs/),
and every config with a model builds its abstract state on its mesh.

The second check runs on the 8 simulated devices, abstractly (`jax.eval_shape`: no weight is
allocated): the model a stage would get, its optimizer state, the mesh validation a stage
runs before compiling (`validate_mesh`, the precision rule, learned-position length) and every
leaf's sharding from the rule table (`state_shardings`), which must split its shape evenly.

Which model a stage gets: `pretrain` (and a white-box distill student) builds `model:` with
`vocab_size: 0` taken as the tokenizer's (`tokenizer.vocab_size`, what the shipped tokenizer
stage trains). A stage that starts from a checkpoint gets the model of the shipped config
that writes that checkpoint (`runs/<name>/checkpoints` or a pipeline's `<i>-<name>`, followed
back to its pretrain), or inside a pipeline the model of the stage before it. A model that
comes from outside (`stage: import`'s HF directory) is skipped, saying so.
"""

import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from jaxllm.config import Config, ModelConfig, from_dict, load_config, to_dict
from jaxllm.models import Decoder
from jaxllm.models.encoder import Encoder
from jaxllm.models.heads import BertPretrainModel, ClassifierModel, with_scalar_head
from jaxllm.models.lora import apply_lora
from jaxllm.sharding import make_mesh
from jaxllm.trainers import STAGES, check_stage
from jaxllm.trainers.lm import check_checkpoint_model, resolve_model, trainable_filter
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import state_shardings, train_state_init

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TRAINS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "distill", "mlm", "classify")
FRESH = ("pretrain", "mlm")  # stages that build `model:` from a seed
USES = ("generate", "score", "export")  # a checkpoint's model on one device, not trained


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "tiny_data.yaml", "tiny_tokenizer.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    check_stage(cfg.stage)
    for sub in cfg.pipeline:
        assert sub.stage in STAGES
    assert from_dict(to_dict(cfg)) == cfg  # the resolved config reloads to the same tree


# ----------------------------------------------------------- which model a stage gets


def fresh_model(cfg: Config, vocab: int = 0) -> ModelConfig:
    """`model:` as pretrain / mlm (or distill, for a student) resolves and checks it: vocab
    0 is the tokenizer's (or the teacher's `vocab`)."""
    arch = "encoder" if cfg.stage == "mlm" else "decoder"
    return resolve_model(cfg, vocab or cfg.tokenizer.vocab_size, arch)


def output_model(cfg: Config, prev: ModelConfig | str | None) -> ModelConfig | str | None:
    """The model in the checkpoint `cfg` writes (None: it writes none)."""
    if cfg.stage in FRESH and not cfg.inputs.checkpoint:
        return fresh_model(cfg)
    if cfg.stage not in TRAINS or (cfg.stage == "distill" and cfg.distill.mode == "black_box"):
        return None
    source = checkpoint_model(cfg.inputs.checkpoint, prev)
    if cfg.stage == "distill" and isinstance(source, ModelConfig):
        return fresh_model(cfg, source.vocab_size)
    return source


def checkpoint_model(path: str, prev: ModelConfig | str | None) -> ModelConfig | str:
    """The model of checkpoint `path` (a pipeline's earlier stage's when empty), or why not."""
    if not path:
        return prev if prev is not None else "needs the stage before it in a pipeline"
    parts = Path(path).parts
    name = re.sub(r"^\d+-", "", parts[-2] if parts[-1] == "checkpoints" else parts[-1])
    source = CONFIG_DIR / f"{name}.yaml"
    if not source.exists():
        return f"no shipped config writes the checkpoint {path}"
    producer = load_config(source)
    if producer.stage == "import":
        return f"its model comes from the HF model that {source.name} imports"
    return output_model(producer, None)


# ------------------------------------------------------------------------- the checks


def check_shardings(abstract, cfg: Config) -> None:
    """Every leaf gets a sharding from the rule table that splits its shape evenly."""
    shardings = state_shardings(abstract, make_mesh(cfg.mesh), cfg.mesh.rules)
    leaves, shards = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
    assert len(leaves) == len(shards) > 0
    for x, s in zip(leaves, shards):
        s.shard_shape(x.shape)  # raises on an uneven split


def check_trained(cfg: Config, m: ModelConfig) -> None:
    """The abstract train state (weights, LoRA adapters, a reward head, Adam's moments)."""

    def build() -> nnx.Module:
        rngs = nnx.Rngs(0)
        if m.arch == "encoder":
            model = Encoder(m, rngs=rngs)
            if cfg.stage == "mlm":
                model = BertPretrainModel(model, rngs=rngs)
            else:
                model = ClassifierModel(model, max(len(cfg.classify.labels), 2), rngs=rngs)
        else:
            model = Decoder(m, rngs=rngs)
        model = with_scalar_head(model, rngs) if cfg.stage == "reward" else model
        if cfg.peft.enabled:
            with nnx.use_eager_sharding(False):
                apply_lora(model, cfg.peft, rngs)
        return model

    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    _, init = train_state_init(build, tx, 0, trainable_filter(cfg.peft))
    check_shardings(jax.eval_shape(init), cfg)


def check_stage_model(cfg: Config, prev: ModelConfig | str | None) -> str | None:
    """Checks the model(s) of one stage; returns why it has none to check, else None."""
    if cfg.stage not in TRAINS + USES:
        return f"stage {cfg.stage} has no model"
    if cfg.stage in FRESH and not cfg.inputs.checkpoint:
        check_trained(cfg, fresh_model(cfg))
        return None
    source = checkpoint_model(cfg.inputs.checkpoint, prev)
    if isinstance(source, str):
        return f"{cfg.name}: {source}"
    built = Encoder if source.arch == "encoder" else Decoder
    nnx.eval_shape(lambda: built(source, rngs=nnx.Rngs(0)))  # the checkpoint's model
    if cfg.stage in USES or (cfg.stage == "distill" and cfg.distill.mode == "black_box"):
        return None  # used on one device, not trained
    if cfg.stage == "distill":  # the teacher teaches a fresh student
        check_trained(cfg, fresh_model(cfg, source.vocab_size))
        return None
    check_checkpoint_model(cfg, source, len(jax.devices()))
    check_trained(cfg, source)
    return None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_its_abstract_state_on_its_mesh(path):
    cfg = load_config(path)
    skipped, prev = [], None
    for sub in cfg.pipeline or (cfg,):
        why = check_stage_model(sub, prev)
        if why:
            skipped.append(why)
        prev = output_model(sub, prev) or prev
    if len(skipped) == len(cfg.pipeline or (cfg,)):
        pytest.skip("; ".join(skipped))
