"""`stage: import` / `export` for the BERT family (`jaxllm/interop/bert.py` maps the names).

Import: a HF BERT directory → a step-0 checkpoint of the model that holds its architecture
(`Encoder`, `BertPretrainModel` or `ClassifierModel`; a BertForMaskedLM has no pooler or NSP
head, so those start fresh and the summary lists them), with the label names of a classifier
in the metadata (`num_labels`, `id2label`, `label2id`) and its WordPiece tokenizer in
`<run_dir>/tokenizer/` (its `tokenizer.json`, or one built from `vocab.txt`), special ids kept.

Export: an encoder checkpoint → `config.json` + `model.safetensors` (+ tokenizer files and
`vocab.txt`) that `transformers.AutoModel*.from_pretrained` loads; `hf.architecture` picks
which class (default: the one the checkpoint's heads hold).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import Config, MeshConfig, to_dict
from jaxllm.errors import ConfigError
from jaxllm.interop import HF_TOKENIZER_FILES, InteropError, SafetensorsReader, load_tokenizer
from jaxllm.interop.bert import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    architecture_of,
    bert_config_json,
    bert_model_config,
    bert_specs,
    check_exportable,
    checkpoint_specs,
    ignored,
    labels_of,
)
from jaxllm.interop.export import write_hf
from jaxllm.interop.hf_weights import check_names
from jaxllm.interop.safetensors_io import load_params, path_key
from jaxllm.models.lora import has_lora, merge_lora
from jaxllm.models.peft import methods_in
from jaxllm.models.quant import dequantize_model, is_quantized
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.wordpiece import (
    WordPieceTokenizer,
    fix_transformers_config,
    wordpiece_from_vocab,
)
from jaxllm.trainers.encoder_model import build_fn, load_encoder_model
from jaxllm.trainers.lm import checkpoint_dir
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import TrainState, count_params, state_shardings

# which HF classes each of our models can be written as
_EXPORTS = {
    "encoder": ("BertModel",),
    "pretrain": ("BertForPreTraining", "BertForMaskedLM", "BertModel"),
    "electra": ("BertModel",),  # the discriminator; its MLM head is the generator's
    "classifier": ("BertForSequenceClassification", "BertModel"),
}


def import_bert(hf_dir: Path, out: Path, cfg: Config, hf: dict, dtype: str) -> dict[str, Any]:
    """Converts the BERT checkpoint in `hf_dir` (config `hf`) into `out/checkpoints`."""
    where = str(hf_dir / "config.json")
    m = bert_model_config(hf, dtype, where)
    reader = SafetensorsReader(hf_dir)
    names = reader.names
    arch = architecture_of(hf, names, where)
    kind = ARCHITECTURES[arch]
    n_labels = reader.info("classifier.weight")[0][0] if "classifier.weight" in names else 0
    if kind == "classifier" and not n_labels:
        raise InteropError(f"{hf_dir}: missing tensor 'classifier.weight' ({arch})")
    specs = checkpoint_specs(m, arch, n_labels, names, hf, str(hf_dir))
    check_names(specs, {n for n in names if not ignored(n, specs)}, False, str(hf_dir))
    tok_path = copy_bert_tokenizer(hf_dir, out, m.vocab_size)
    state, fresh = _build_state(
        reader, specs, build_fn(m, kind, n_labels, cfg.seed), cfg, str(hf_dir)
    )
    meta: dict[str, Any] = {"config": to_dict(cfg), "model": to_dict(m), "tokenizer": tok_path,
                            "step": 0, "hf_architecture": arch}  # fmt: skip
    if kind == "classifier":
        labels = labels_of(hf, n_labels, where)
        meta.update(num_labels=n_labels, id2label={str(i): x for i, x in enumerate(labels)},
                    label2id={x: i for i, x in enumerate(labels)})  # fmt: skip
    ckpt = Checkpointer(checkpoint_dir(out), keep=1, async_save=False, save_concurrent_gb=1)
    ckpt.save(0, state, meta)
    ckpt.close()
    return {
        "params": count_params(state.params),
        "family": "bert",
        "architecture": arch,
        "source": str(hf_dir),
        "dtype": dtype,
        "vocab_size": m.vocab_size,
        "num_labels": n_labels,
        "fresh_params": fresh,  # parameters the HF checkpoint has none of, initialised here
        "outputs": {"checkpoint": str(checkpoint_dir(out)), "tokenizer": tok_path},
    }


def _build_state(
    reader: SafetensorsReader, specs: list, fn: Any, cfg: Config, where: str
) -> tuple[TrainState, list[str]]:
    """A step-0 TrainState: HF weights read straight onto their shardings, the parameters no
    tensor holds initialised under jit in theirs; returns it and those parameters' names."""
    from jaxllm.trainers.hf_import import fresh_opt_state  # local: hf_import dispatches here

    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)

    def init(params: nnx.State) -> TrainState:
        _, _, frozen = nnx.split(fn(), nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(cfg.seed)),
        )

    abstract = nnx.split(nnx.eval_shape(fn), nnx.Param, ...)[1]
    shardings = state_shardings(jax.eval_shape(init, abstract), mesh, cfg.mesh.rules)
    sharding_of = {
        path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings.params)[0]
    }
    have = {tuple(s.ours) for s in specs}
    missing = [k for k in sharding_of if k not in have]

    def init_missing() -> list[jax.Array]:
        params = nnx.split(fn(), nnx.Param, ...)[1]
        flat = {path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        return [flat[k] for k in missing]

    made = jax.jit(init_missing, out_shardings=[sharding_of[k] for k in missing])()
    params = load_params(reader, specs, abstract, shardings.params, where, dict(zip(missing, made)))
    opt_state = fresh_opt_state(tx, params, shardings.opt_state)
    rest = shardings.replace(opt_state=None)
    state = jax.jit(lambda p: init(p).replace(opt_state=None), out_shardings=rest, donate_argnums=0)
    return state(params).replace(opt_state=opt_state), [".".join(map(str, k)) for k in missing]


def copy_bert_tokenizer(hf_dir: Path, out: Path, vocab_size: int) -> str:
    """The checkpoint's WordPiece tokenizer in `out/tokenizer` (its `tokenizer.json` files, or
    one built from `vocab.txt`), checked to load with its special tokens; "" when it has none."""
    dest = out / "tokenizer"
    if (hf_dir / "tokenizer.json").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        for name in (*HF_TOKENIZER_FILES, "vocab.txt"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, dest / name)
    elif (hf_dir / "vocab.txt").is_file():
        wordpiece_from_vocab(hf_dir / "vocab.txt", dest)
    else:
        return ""
    tok = load_tokenizer(dest)
    if not isinstance(tok, WordPieceTokenizer):
        raise InteropError(f"{hf_dir / 'tokenizer.json'}: not a WordPiece tokenizer (BERT's)")
    if tok.vocab_size > vocab_size:
        raise InteropError(
            f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but config.json's "
            f"vocab_size is {vocab_size}"
        )
    return str(dest)


def export_bert_checkpoint(
    ckpt: Path, out: Path, dtype: str = "float32", mesh_cfg: MeshConfig | None = None,
    architecture: str = "", dequantize: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Loads an encoder checkpoint (LoRA merged) on the mesh and writes it to `out` as
    `architecture` (default: the checkpoint's own, else the class its heads hold). A
    quantised one (a QLoRA run's base) is refused unless `dequantize` (scale * int, the
    adapters merged), as the decoder export does."""
    mesh_cfg = mesh_cfg or MeshConfig()
    loaded = load_encoder_model(ckpt, make_mesh(mesh_cfg), mesh_cfg.rules, "BERT export")
    graphdef, state = loaded.graphdef, loaded.state
    if is_quantized(state):
        if not dequantize:
            raise ConfigError(
                f"config key 'inputs.checkpoint': {ckpt} is quantised (int weights + scales), "
                "which HF BERT safetensors cannot hold; set hf.dequantize: true to write "
                "scale * int weights (adapters merged)"
            )
        model = nnx.merge(graphdef, state)
        dequantize_model(model)
        graphdef, state = nnx.split(model)
    if has_lora(state):
        model = nnx.merge(graphdef, state)
        merge_lora(model)
        graphdef, state = nnx.split(model)
    left = [method.name for method in methods_in(state)]  # what merging could not fold in
    if left:
        raise InteropError(
            f"config key 'inputs.checkpoint': {ckpt} was trained with peft.method {left[0]}, "
            "which a HF BERT directory cannot hold (only lora merges into plain weights)"
        )
    m, meta, kind = loaded.model, loaded.meta, loaded.kind
    own = meta.get("hf_architecture", "")
    arch = architecture or (own if own in _EXPORTS[kind] else DEFAULT_ARCHITECTURE[kind])
    if kind == "electra" and arch != "BertModel":
        raise InteropError(
            f"hf.architecture: {ckpt} is an ELECTRA run (mlm.objective: electra): its encoder "
            f"is the discriminator, which has no MLM or NSP head to write as {arch} (the MLM "
            "head belongs to the smaller generator); export it as BertModel"
        )
    if arch not in _EXPORTS[kind]:
        raise InteropError(
            f"hf.architecture: a {kind} checkpoint cannot be written as {arch} (it can be: "
            f"{', '.join(_EXPORTS[kind])})"
        )
    pooling = meta.get("config", {}).get("classify", {}).get("pooling", "cls")
    if arch == "BertForSequenceClassification" and pooling != "cls":
        raise InteropError(
            f"hf.architecture: this classifier reads the {pooling} of the token features "
            "(classify.pooling), BertForSequenceClassification the pooled [CLS]: its logits "
            "would differ; export it as BertModel (the encoder) instead"
        )
    check_exportable(m)
    tok = _tokenizer(meta.get("tokenizer", ""))
    labels = _labels(meta, loaded.num_labels) if arch == "BertForSequenceClassification" else None
    pad = tok.pad_id if tok is not None else 0
    config = bert_config_json(m, arch, dtype, labels, pad)
    wrapped = kind != "encoder"
    if kind == "electra":  # the discriminator alone: the generator is no part of the export
        graphdef, state = nnx.split(nnx.merge(graphdef, state).encoder)
        wrapped = False
    specs = bert_specs(m, arch, loaded.num_labels, wrapped=wrapped)
    write_hf(state, specs, config, out, dtype, "is it a BERT model?")
    nfkc = False
    if tok is not None and jax.process_index() == 0:
        tok.save(out)
        tok.save_vocab(out)
        nfkc = fix_transformers_config(out)  # a config written before NFKC models said so
    summary = {
        "params": count_params(state),
        "family": "bert",
        "architecture": arch,
        "checkpoint_step": meta.get("step"),
        "dtype": dtype,
        "outputs": {"hf": str(out), "tokenizer": str(out) if tok is not None else ""},
    }
    if nfkc:
        summary["tokenizer_note"] = _NFKC_NOTE
    return summary


_NFKC_NOTE = (
    "the tokenizer normalises with NFKC (tokenizer.normalization: nfkc): AutoTokenizer reads "
    "tokenizer.json as saved (PreTrainedTokenizerFast) and gives jaxllm's ids; vocab.txt "
    "(the slow BertTokenizer) cannot hold the NFKC step and tokenizes some text differently"
)


def _tokenizer(path: str) -> WordPieceTokenizer | None:
    if not path or not Path(path).exists():
        return None
    tok = load_tokenizer(path)
    return tok if isinstance(tok, WordPieceTokenizer) else None


def _labels(meta: dict[str, Any], n: int) -> list[str]:
    """Label names in id order: an imported classifier's `id2label`, a `stage: classify`
    run's labels (its head's), else LABEL_i."""
    raw = meta.get("id2label") or {}
    names = {int(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    trained = (meta.get("head") or {}).get("labels") or []
    if not names and len(trained) == n:
        names = dict(enumerate(map(str, trained)))
    return [names.get(i, f"LABEL_{i}") for i in range(n)]
