"""Encoder (BERT) checkpoints: which model wrote one, read from its saved parameter names, and
that model loaded with its heads.

Four models hold an encoder (`models/heads.py`): a bare `Encoder` (an imported `BertModel`;
parameters `params.embed...`), `BertPretrainModel` (stage mlm, an imported BertForMaskedLM or
BertForPreTraining; `params.encoder...`, `params.mlm...`, `params.nsp...`),
`ElectraPretrainModel` (stage mlm with `mlm.objective: electra`; `params.encoder...` the
discriminator, `params.generator...` + `params.mlm...` the generator, `params.rtd_*` the
replaced-token head; no NSP head) and `ClassifierModel` (stage classify, an imported
BertForSequenceClassification; `params.encoder...`, `params.head.kernel` [D, num_labels]).
Stages that only need the features (`embed`, dense retrieval, export as `BertModel`, a PEFT
run's base) take `.encoder` of whichever it is: ELECTRA's discriminator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax import nnx

from jaxllm.config import MLMConfig, ModelConfig, from_dict, replace
from jaxllm.errors import ConfigError
from jaxllm.models.encoder import Encoder
from jaxllm.models.heads import BertPretrainModel, ClassifierModel, ElectraPretrainModel
from jaxllm.models.layers import ParamKeys
from jaxllm.trainers.checkpoint_model import Wrap, load_checkpoint_model
from jaxllm.training.checkpoint import Checkpointer

KINDS = ("encoder", "pretrain", "electra", "classifier")


@dataclass
class LoadedEncoder:
    """A loaded encoder checkpoint: the whole model (graphdef + state), its config, metadata,
    which of `KINDS` it is and, for a classifier, how many labels."""

    graphdef: nnx.GraphDef
    state: nnx.State
    model: ModelConfig
    meta: dict[str, Any]
    kind: str
    num_labels: int = 0

    def encoder(self) -> tuple[nnx.GraphDef, nnx.State]:
        """The `Encoder` alone (a wrapped model's `.encoder`), as graphdef + state."""
        model = nnx.merge(self.graphdef, self.state)
        return nnx.split(getattr(model, "encoder", model))


def kind_of(shapes: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    """`(kind, num_labels)` from a checkpoint's saved shapes (`Checkpointer.saved_shapes`).
    ELECTRA's generator has an MLM head too: its replaced-token head tells it apart."""
    if "params.rtd_out" in shapes:
        return "electra", 0
    if "params.mlm.kernel" in shapes:
        return "pretrain", 0
    head = shapes.get("params.head.kernel")
    if head is not None and any(k.startswith("params.encoder.") for k in shapes):
        return "classifier", int(head[-1])
    return "encoder", 0


def generator_config(m: ModelConfig, mlm: MLMConfig) -> ModelConfig:
    """ELECTRA's generator: the encoder `m`, `mlm.generator_layers` deep and
    `mlm.generator_d_ff` wide (0: a quarter of `m.d_ff`)."""
    return replace(m, n_layers=mlm.generator_layers, d_ff=mlm.generator_d_ff or max(m.d_ff // 4, 1))


def wrap_for(kind: str, num_labels: int = 0, generator: ModelConfig | None = None) -> Wrap | None:
    """The `wrap` that puts `kind`'s heads around an `Encoder` (None: the bare encoder);
    `generator`: ELECTRA's generator config (`generator_config`), for kind electra."""
    if kind == "pretrain":
        return lambda enc, rngs: BertPretrainModel(enc, rngs=rngs)
    if kind == "electra":
        if generator is None:
            raise ValueError("wrap_for('electra') needs the generator's ModelConfig")
        return lambda enc, rngs: ElectraPretrainModel(enc, Encoder(generator, rngs=rngs), rngs=rngs)
    if kind == "classifier":
        return lambda enc, rngs: ClassifierModel(enc, num_labels, rngs=rngs)
    return None


def build_fn(m: ModelConfig, kind: str, num_labels: int = 0, seed: int = 0) -> Callable:
    """A function building `kind`'s model (fresh weights from `seed`)."""
    wrap = wrap_for(kind, num_labels)

    def build() -> nnx.Module:
        keys = ParamKeys(seed)  # one key sequence: the heads' keys follow the encoder's
        enc = Encoder(m, rngs=keys)
        return wrap(enc, keys) if wrap else enc

    return build


def checkpoint_arch(ckpt_dir: Path, key: str = "config key 'inputs.checkpoint'") -> str:
    """`model.arch` of the newest checkpoint in `ckpt_dir` (from its metadata alone); `key`
    names the setting that gave the directory in messages."""
    if not Path(ckpt_dir).is_dir():
        raise ConfigError(f"{key}: {ckpt_dir} not found")
    ckpt = Checkpointer(Path(ckpt_dir), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise ConfigError(f"{key}: no checkpoint in {ckpt_dir}")
    meta = ckpt.read_meta(step)
    ckpt.close()
    return str(meta.get("model", {}).get("arch", "decoder"))


def load_encoder_model(
    ckpt_dir: Path, mesh, rules: str = "dp", why: str = "",
    key: str = "config key 'inputs.checkpoint'",
) -> LoadedEncoder:  # fmt: skip
    """The newest checkpoint of `ckpt_dir` with the heads it was saved with (weights only;
    a PEFT run's: its base's encoder with the method put back, LoRA unmerged); a decoder
    checkpoint is refused, saying `why` an encoder is needed and naming `key`."""
    if checkpoint_arch(ckpt_dir, key) != "encoder":
        raise ConfigError(
            f"{key}: {ckpt_dir} holds a decoder (model.arch: "
            f"decoder); {why or 'this'} needs an encoder checkpoint (model.arch: encoder)"
        )
    ckpt = Checkpointer(Path(ckpt_dir), async_save=False)
    step = ckpt.latest_step()
    kind, n = kind_of(ckpt.saved_shapes(step))  # a PEFT run's: its method's variables + head
    generator = None
    if kind == "electra":  # the generator's shape: the run's mlm.generator_* settings
        meta = ckpt.read_meta(step)
        m = from_dict({"stage": "mlm", "model": meta["model"]}).model
        generator = generator_config(m, from_dict(meta["config"]).mlm)
    ckpt.close()
    graphdef, state, m, meta = load_checkpoint_model(
        Path(ckpt_dir), mesh, rules, step, wrap=wrap_for(kind, n, generator), arch="encoder"
    )
    return LoadedEncoder(graphdef, state, m, meta, kind, n)
