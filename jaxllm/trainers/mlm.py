"""`stage: mlm` — BERT pretraining of an encoder: masked-LM + next-sentence prediction on
sentence pairs from the cleaned corpus, in the generic loop.

The same machine as decoder pretraining, fed different parts: the model is
`BertPretrainModel` (the encoder of `model:`, or of `inputs.checkpoint` to go on pretraining
it, with fresh MLM/NSP heads), the batches come from `data/mlm.py` and the loss is
`mlm_nsp_loss`. Held-out figures on the validation split, the same pairs and masks every
time: MLM accuracy and loss over the chosen tokens, NSP accuracy and loss, before and after
training, and what a unigram model gets on the same targets (its most frequent token's rate
and its cross-entropy, fitted on the train split). Checkpoints record `arch: encoder` and
`head: mlm`; `stage: classify` reads their encoder.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config, ModelConfig, replace, to_dict
from jaxllm.data.jsonl_source import JsonlSource
from jaxllm.data.mlm import make_mlm_dataset, make_mlm_eval_dataset, split_sentences
from jaxllm.data.sources import cleaned_shards
from jaxllm.errors import ConfigError
from jaxllm.models.encoder import Encoder
from jaxllm.models.heads import BertPretrainModel, ElectraPretrainModel
from jaxllm.models.layers import ParamKeys
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer
from jaxllm.trainers import require_input
from jaxllm.trainers.checkpoint_model import fresh_train_state
from jaxllm.trainers.encoder import checkpoint_encoder, encoder_inputs, load_wordpiece
from jaxllm.trainers.encoder_model import generator_config
from jaxllm.trainers.held_out import make_totals
from jaxllm.trainers.lm import (
    best_figures,
    checkpoint_dir,
    keep_tokenizer,
    loop_spec,
    output_checkpoint,
    resolve_model,
    restore_or_init,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.losses import electra_corrupt, electra_loss_terms, mlm_nsp_loss
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import count_params, create_train_state
from jaxllm.training.step import make_eval_step, make_train_step

_UNIGRAM_DOCS = 5000  # train documents the unigram baseline is fitted on
_UNIGRAM_CHUNK = 500  # of them tokenized at a time


def mlm_loss(model: BertPretrainModel, batch: dict[str, jax.Array], key, nsp: bool = True):
    """`loss_fn(model, batch, key)` of the stage: `mlm_nsp_loss` of the model's two heads
    (`nsp=False`: the masked-LM term alone, `mlm.nsp: false`)."""
    mlm_BMV, nsp_B2 = model(batch["tokens"], batch["mask_positions"], **encoder_inputs(batch, key))
    return mlm_nsp_loss(
        mlm_BMV, batch["mask_targets"], batch["mask_weights"], nsp_B2, batch["nsp_labels"],
        batch["nsp_weights"], nsp,
    )  # fmt: skip


def electra_loss(model: ElectraPretrainModel, batch: dict[str, jax.Array], key, disc_weight: float):
    """`loss_fn(model, batch, key)` of `mlm.objective: electra`: the generator's MLM logits at
    the chosen positions, one sample from them per position (no gradient flows through the
    sample), the corrupted rows through the discriminator, `electra_loss_terms`. Without a
    key (evaluation) the samples come from a fixed key: the same every time."""
    k_drop, k_sample = (None, jax.random.key(0)) if key is None else jax.random.split(key)
    kw = encoder_inputs(batch, k_drop)
    gen_BMV = model.generate(batch["tokens"], batch["mask_positions"], **kw)
    sampled_BM = jax.random.categorical(k_sample, jax.lax.stop_gradient(gen_BMV))
    corrupted_BL, labels_BL = electra_corrupt(
        batch["tokens"], batch["mask_positions"], batch["mask_targets"], batch["mask_weights"],
        sampled_BM,
    )  # fmt: skip
    disc_BL = model.discriminate(corrupted_BL, **kw)
    return electra_loss_terms(
        gen_BMV, batch["mask_targets"], batch["mask_weights"], disc_BL, labels_BL,
        batch["segment_ids"] > 0, batch["nsp_weights"], disc_weight,
    )  # fmt: skip


def stage_loss(cfg: Config):
    """The stage's `loss_fn`: ELECTRA's, or the masked-LM with or without NSP (`mlm.nsp`)."""
    if cfg.mlm.objective == "electra":
        return partial(electra_loss, disc_weight=cfg.mlm.disc_weight)
    return mlm_loss if cfg.mlm.nsp else partial(mlm_loss, nsp=False)


def pretrain_model(cfg: Config, encoder: Encoder, m: ModelConfig, rngs: nnx.Rngs):
    """The heads around `encoder` for `mlm.objective`: BERT's MLM + NSP heads, or ELECTRA's
    generator (`generator_layers` deep, `generator_d_ff` wide) and replaced-token head."""
    if cfg.mlm.objective != "electra":
        return BertPretrainModel(encoder, rngs=rngs)
    gm = generator_config(m, cfg.mlm)  # what encoder_model rebuilds to load the checkpoint
    return ElectraPretrainModel(encoder, Encoder(gm, rngs=rngs), rngs=rngs)


def with_unigram(loss_fn, logp_V: np.ndarray):
    """`loss_fn` whose aux also sums what a unigram model (log-probs `logp_V`) gets on the
    batch's chosen targets: `unigram_correct` (the target is its most likely token) and
    `unigram_ce`; in the eval step, so the figures cover every process's pairs."""
    top, table_V = int(np.argmax(logp_V)), jnp.asarray(logp_V, jnp.float32)

    def fn(model, batch, key):
        loss, aux = loss_fn(model, batch, key)
        w_BM, t_BM = batch["mask_weights"], batch["mask_targets"]
        aux["unigram_correct"] = jnp.sum(w_BM * (t_BM == top))
        aux["unigram_ce"] = -jnp.sum(jnp.where(w_BM > 0, w_BM * table_V[t_BM], 0.0))
        return loss, aux

    return fn


def unigram_log_probs(tok: WordPieceTokenizer, data_dir: Path) -> np.ndarray:
    """[V] add-one smoothed unigram log-probabilities of the non-special tokens of
    `_UNIGRAM_DOCS` train documents spread evenly over the split (shards hold sources in
    turn: the first documents would be one source's), specials -inf (never a target).
    Of N documents, every k-th from the first (k = max(1, N // _UNIGRAM_DOCS)), read by
    index (`JsonlSource`): memory holds the sample, not the split."""
    shards = cleaned_shards(data_dir, "train")
    source = JsonlSource(shards, require=("text",))
    picked = range(0, len(source), max(1, len(source) // _UNIGRAM_DOCS))
    special = tok.special_mask()
    counts = np.where(special, 0.0, 1.0)
    for start in range(0, len(picked), _UNIGRAM_CHUNK):
        texts = [
            " ".join(split_sentences(source[i]["text"]))
            for i in picked[start : start + _UNIGRAM_CHUNK]
        ]
        for ids in tok.encode_batch(texts):
            counts += np.bincount(np.asarray(ids, np.int64), minlength=len(counts))[: len(counts)]
    source.close()
    counts[special] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def mlm_figures(t: dict[str, float]) -> dict[str, float]:
    """Held-out figures from the summed aux of every eval batch (ELECTRA: the MLM figures are
    the generator's, and the replaced-token figures are added)."""
    pairs, tokens = max(t.get("weight", 0.0), 1e-9), max(t.get("mlm_tokens", 0.0), 1e-9)
    out = {
        "loss": t["loss"] / pairs,
        "mlm_accuracy": t["mlm_correct"] / tokens,
        "mlm_loss": t["mlm_ce"] / tokens,
        "unigram_mlm_accuracy": t.get("unigram_correct", 0.0) / tokens,
        "unigram_mlm_loss": t.get("unigram_ce", 0.0) / tokens,
        "pairs": t.get("weight", 0.0),
        "mlm_tokens": t.get("mlm_tokens", 0.0),
    }
    if "nsp_accuracy" in t:
        out.update(nsp_accuracy=t["nsp_accuracy"] / pairs, nsp_loss=t["nsp_loss"] / pairs)
    if "disc_tokens" in t:
        seen = max(t["disc_tokens"], 1e-9)
        out.update(disc_accuracy=t["disc_correct"] / seen, disc_loss=t["disc_ce"] / seen,
                   replaced_share=t["disc_replaced"] / seen)  # fmt: skip
    return out


def _initial_state(cfg: Config, tok: WordPieceTokenizer, tx, mesh):
    """`(graphdef, state, shardings, model config, input checkpoint or "")`: `model:` from
    a seed, or the encoder of `inputs.checkpoint` with fresh heads."""
    rules = cfg.mesh.rules
    if not cfg.inputs.checkpoint:
        m = resolve_model(cfg, tok.vocab_size, arch="encoder")

        def build() -> nnx.Module:
            keys = ParamKeys(cfg.seed)  # one key sequence: the heads' keys follow the encoder's
            return pretrain_model(cfg, Encoder(m, rngs=keys), m, keys)

        return (*create_train_state(build, tx, mesh, rules, cfg.seed), m, "")
    encoder, m, _, source = checkpoint_encoder(cfg, mesh)
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"config key 'inputs.tokenizer': {tok.vocab_size} tokens but the checkpoint's "
            f"encoder has vocab_size {m.vocab_size}; use the tokenizer it was trained with"
        )
    model = pretrain_model(cfg, encoder, m, nnx.Rngs(params=cfg.seed))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    state, shardings = fresh_train_state(params, frozen, tx, mesh, rules, cfg.seed)
    return graphdef, state, shardings, replace(m, param_dtype="float32"), source


def _evaluator(cfg: Config, tok, data_dir: Path, graphdef, shardings, mesh):
    """`evaluate(state) -> mlm_figures` on the validation split (None if it is empty)."""
    val = cleaned_shards(data_dir, "val")
    if not val:
        return None
    loss_fn = with_unigram(stage_loss(cfg), unigram_log_probs(tok, data_dir))
    eval_step = make_eval_step(graphdef, loss_fn, shardings, mesh, cfg.mesh.rules)
    pi, pc = jax.process_index(), jax.process_count()

    def batches(num_batches: int | None):
        return make_mlm_eval_dataset(
            val, tok, cfg.loader, cfg.mlm, seed=cfg.seed, process_index=pi, process_count=pc,
            num_batches=num_batches,
        )  # fmt: skip

    totals = make_totals(eval_step, batches, mesh, cfg.train.eval_batches)
    return lambda state: mlm_figures(totals(state))


def _final_figures(last: dict[str, Any], evaluate, state) -> dict[str, float]:
    """The held-out figures of the final state: the loop's evaluation at the last step
    (it always runs one there), or a fresh one when the loop had no step left to run."""
    found = {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_")}
    return found or (evaluate(state) if evaluate else {})


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Pretrains an encoder with MLM + NSP on `inputs.data_dir`."""
    if cfg.peft.enabled:
        raise ConfigError("config key 'peft.method': mlm pretrains every weight; set it to none")
    tok = load_wordpiece(require_input(cfg, "tokenizer"))
    data_dir = require_input(cfg, "data_dir")
    t, mesh = cfg.train, make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    graphdef, state, shardings, m, source = _initial_state(cfg, tok, tx, mesh)
    tok_path = keep_tokenizer(tok, run_dir.path)
    ds = make_mlm_dataset(
        cleaned_shards(data_dir, "train"), tok, cfg.loader, cfg.mlm, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    evaluate = _evaluator(cfg, tok, data_dir, graphdef, shardings, mesh)
    before = evaluate(state) if evaluate else {}  # the initial weights, also on a resume
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    step_fn = make_train_step(
        graphdef, stage_loss(cfg), tx, lr_schedule(t.optim, t.steps), shardings, mesh,
        cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    meta = {"config": to_dict(cfg), "model": to_dict(m), "tokenizer": str(tok_path),
            "head": {"kind": cfg.mlm.objective}, **({"base_checkpoint": source} if source else {})}  # fmt: skip
    state, last = run_loop(loop_spec(cfg, step_fn, batches, mesh, evaluate, meta), state, ckpt,
                           run_dir.path)  # fmt: skip
    ckpt.close()
    after = _final_figures(last, evaluate, state)
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    return _summary(cfg, state, start, last, before, after, plot, run_dir, tok_path)


def _summary(cfg, state, start, last, before, after, plot, run_dir, tok_path) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "params": count_params(state.params),
        "steps": cfg.train.steps,
        "resumed_from_step": start,
        "final_train_loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"),
    }
    keys = ("mlm_accuracy", "mlm_loss") + (("nsp_accuracy", "nsp_loss") if cfg.mlm.nsp else ())
    if cfg.mlm.objective == "electra":  # the generator's MLM figures, the encoder's detection
        keys += ("disc_accuracy", "disc_loss", "replaced_share")
    for key in keys:  # without NSP its head never trains: no figures to report
        if key in before:
            summary[f"val_{key}_before"] = round(before[key], 4)
            summary[f"val_{key}_after"] = round(after[key], 4)
    for key in ("unigram_mlm_accuracy", "unigram_mlm_loss", "pairs", "mlm_tokens"):
        if key in after:
            summary[f"val_{key}"] = round(after[key], 4)
    summary["loss_plot"] = plot.name if plot else None
    summary.update(best_figures(last))  # train.keep_best hands on the best evaluation's
    summary["outputs"] = {"checkpoint": output_checkpoint(cfg, run_dir.path), "tokenizer": tok_path}
    return summary
