"""What the encoder stages (`mlm`, `classify`) share: the WordPiece tokenizer check, encoder
checkpoints (the `encoder` weights alone, any heads dropped), an encoder built in its
shardings from a seed, and the encoder's inputs from a batch.

An encoder checkpoint is a run of `stage: mlm` or `stage: classify`: its metadata's model has
`arch: encoder`, its weights sit under `encoder.` (`BertPretrainModel`, `ClassifierModel`;
a bare `Encoder` tree is read as well) and `head` says which heads are beside it. Only the
encoder's subtree is read (an orbax partial restore), so a head of another shape (an MLM
head, a classifier with other labels) never has to be rebuilt to load its backbone.
(`encoder_model.py` loads a checkpoint whole, heads included: export and embed.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxllm.config import Config, ModelConfig, from_dict, replace
from jaxllm.errors import ConfigError
from jaxllm.models.encoder import Encoder
from jaxllm.models.layers import ParamKeys
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer
from jaxllm.trainers import require_input
from jaxllm.trainers.checkpoint_model import check_arch
from jaxllm.trainers.lm import check_checkpoint_model, keep_tokenizer
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.state import state_shardings


def load_wordpiece(path: str | Path, key: str = "inputs.tokenizer") -> WordPieceTokenizer:
    """The WordPiece tokenizer at `path`; anything else (a sentencepiece model, a BPE
    `tokenizer.json`) is a one-line error naming `key`."""
    from jaxllm.interop import load_tokenizer  # local: interop is only needed here

    if not path:
        raise ConfigError(f"config key '{key}' is empty: give a WordPiece tokenizer.json")
    if not Path(path).exists():
        raise ConfigError(f"config key '{key}': {path} does not exist")
    tok = load_tokenizer(Path(path))
    if not isinstance(tok, WordPieceTokenizer):
        kind = type(tok).__name__
        raise ConfigError(
            f"config key '{key}': {path} is a {kind} ({getattr(tok, 'kind', 'decoder')} "
            "tokenizer), but encoder stages need BERT's WordPiece with [CLS]/[SEP]/[MASK]; "
            "train one with stage: tokenizer, tokenizer.model_type: wordpiece"
        )
    return tok


def stage_wordpiece(cfg: Config, meta: dict[str, Any], m: ModelConfig):
    """`(tok, kept path)`: `inputs.tokenizer`, else the checkpoint's, which must fit `m`."""
    key = "inputs.tokenizer" if cfg.inputs.tokenizer else "the checkpoint's tokenizer"
    tok = load_wordpiece(cfg.inputs.tokenizer or meta.get("tokenizer", ""), key)
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"config key 'inputs.tokenizer': {tok.path} has {tok.vocab_size} tokens but the "
            f"encoder has vocab_size {m.vocab_size}; use the tokenizer it was pretrained with"
        )
    return tok, keep_tokenizer(tok, cfg.run_dir)


class EncoderCheckpoint:
    """An encoder checkpoint directory's newest step, metadata and model config; refuses a
    decoder's checkpoint and a LoRA run's adapters-only one with one line each."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.directory = Path(ckpt_dir).absolute()
        self.ckpt = Checkpointer(self.directory, async_save=False)
        step = self.ckpt.latest_step()
        if step is None:
            raise ConfigError(f"config key 'inputs.checkpoint': no checkpoint in {ckpt_dir}")
        self.step = step
        self.meta = self.ckpt.read_meta(step)
        where = f"{self.directory}/{step}"
        if "model" not in self.meta or "config" not in self.meta:
            raise ConfigError(f"{where}: not a jaxllm model checkpoint (no model metadata)")
        run_cfg = from_dict(self.meta["config"])
        self.model = from_dict({"stage": "mlm", "model": self.meta["model"]}).model
        check_arch(self.model, "encoder", where, run_cfg.stage)
        if run_cfg.peft.enabled:
            raise ConfigError(
                f"{where}: a {run_cfg.peft.method} run's checkpoint holds its adapters only; "
                "start from its base encoder (the mlm checkpoint) instead"
            )

    def restore(self, m: ModelConfig, mesh, rules: str) -> Encoder:
        """The checkpoint's encoder weights in an `Encoder(m)` (`m`: its model config, with
        e.g. another dropout), built in their shardings; heads are not read."""
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Encoder(m, rngs=ParamKeys(0))))
        shardings = state_shardings(params, mesh, rules)
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
        )
        nested = self._nested()
        tree = nnx.State({"encoder": target}) if nested else target
        restored, _ = self.ckpt.restore_params(self.step, tree)
        self.ckpt.close()
        return nnx.merge(graphdef, restored["encoder"] if nested else restored)

    def _nested(self) -> bool:
        """Whether the weights sit under `encoder.` (a model with heads) or at the root."""
        saved = self.ckpt.manager.item_metadata(self.step)["state"]
        return "encoder" in saved["params"]


def init_encoder(m: ModelConfig, seed: int, mesh, rules: str) -> Encoder:
    """A fresh `Encoder(m)` from `seed`, its weights created in their shardings (never whole
    on one device first)."""

    def build() -> nnx.State:
        return nnx.split(Encoder(m, rngs=ParamKeys(seed)))[1]

    graphdef = nnx.split(nnx.eval_shape(lambda: Encoder(m, rngs=ParamKeys(seed))))[0]
    shardings = state_shardings(jax.eval_shape(build), mesh, rules)
    return nnx.merge(graphdef, jax.jit(build, out_shardings=shardings)())


def checkpoint_encoder(cfg: Config, mesh, weights: bool = True, dropout: float | None = None):
    """`(encoder or None, model config, meta, checkpoint dir)` of `inputs.checkpoint`: its
    encoder weights when `weights` (else only its model config and metadata), running
    `dropout` when given (else the checkpoint's)."""
    source = EncoderCheckpoint(require_input(cfg, "checkpoint"))
    m = source.model if dropout is None else replace(source.model, dropout=dropout)
    check_checkpoint_model(cfg, m)
    encoder = source.restore(m, mesh, cfg.mesh.rules) if weights else None
    return encoder, m, source.meta, str(source.directory)


def encoder_inputs(batch: dict[str, jax.Array], key: jax.Array | None) -> dict[str, Any]:
    """The keyword arguments an encoder (or a model around one) takes from a batch."""
    return dict(
        segment_ids_BL=batch["segment_ids"],
        token_types_BL=batch["token_types"],
        deterministic=key is None,
        key=key,
    )
