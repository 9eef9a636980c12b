"""The Hugging Face BERT family (`model_type: bert`) ↔ jaxllm's `Encoder` and its heads:
`config.json` ↔ `ModelConfig`, and one `Spec` per parameter, both ways.

  BertModel                      ↔ Encoder                  (HF names without a prefix)
  BertForMaskedLM                ↔ BertPretrainModel        (its pooler and NSP head are new)
  BertForPreTraining             ↔ BertPretrainModel
  BertForSequenceClassification  ↔ ClassifierModel(num_labels)
  BertModel                      ← ElectraPretrainModel     (export only: its discriminator)

Layouts: torch `Linear` weights are [out, in], so every matrix is transposed; q/k/v
[N*H, D] → [D, N, H]; the attention output [D, N*H] → [N, H, D]. The MLM decoder is the word
embedding (tied, as our `MLMHead` always is); `cls.predictions.bias` is its bias.
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.interop.hf_config import InteropError
from jaxllm.interop.hf_weights import Path_, Spec

# HF architecture → which of our models holds it
ARCHITECTURES = {
    "BertModel": "encoder",
    "BertForMaskedLM": "pretrain",
    "BertForPreTraining": "pretrain",
    "BertForSequenceClassification": "classifier",
}
# our model → the architecture export writes unless told otherwise
DEFAULT_ARCHITECTURE = {
    "encoder": "BertModel",
    "pretrain": "BertForPreTraining",
    "electra": "BertModel",  # ELECTRA's discriminator (no MLM/NSP head of its own)
    "classifier": "BertForSequenceClassification",
}
_EXACT_GELU = ("gelu", "gelu_python")
# saved by some checkpoints, never needed: position-id buffers, the tied MLM decoder's copy
_IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight")


def architecture_of(hf: dict[str, Any], names: set[str], where: str) -> str:
    """The BERT architecture a checkpoint holds: `architectures[0]` of its config.json, else
    read from its tensor names."""
    archs = hf.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise InteropError(
                f"{where}: architecture '{archs[0]}' unsupported (supported: "
                f"{', '.join(ARCHITECTURES)})"
            )
        return archs[0]
    if "classifier.weight" in names:
        return "BertForSequenceClassification"
    if "cls.seq_relationship.weight" in names:
        return "BertForPreTraining"
    if any(n.startswith("cls.predictions.") for n in names):
        return "BertForMaskedLM"
    return "BertModel"


def bert_model_config(hf: dict[str, Any], dtype: str, where: str) -> ModelConfig:
    """The encoder's `ModelConfig` for a parsed BERT config.json (`dtype`: params and
    compute); anything our Encoder cannot reproduce exactly is refused, naming the key."""
    act = hf.get("hidden_act", "gelu")
    if act not in _EXACT_GELU:
        raise InteropError(f"{where}: hidden_act '{act}' unsupported (need gelu, BERT's exact)")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise InteropError(f"{where}: position_embedding_type '{pos}' unsupported (absolute)")
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            raise InteropError(f"{where}: {key}: true is not supported (BERT as an encoder)")
    d, n = _need(hf, "hidden_size", where), _need(hf, "num_attention_heads", where)
    if d % n:
        raise InteropError(f"{where}: hidden_size {d} is not divisible by num_attention_heads {n}")
    m = ModelConfig(
        arch="encoder",
        vocab_size=_need(hf, "vocab_size", where),
        d_model=d,
        n_layers=_need(hf, "num_hidden_layers", where),
        n_heads=n,
        d_ff=_need(hf, "intermediate_size", where),
        max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post",
        mlp="gelu_exact",
        positions="learned",
        use_bias=True,
        tie_embeddings=True,
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        dtype=dtype,
        param_dtype=dtype,
    )
    try:
        m._validate()
    except ValueError as e:
        raise InteropError(f"{where}: unusable model shape ({e})") from None
    return m


def _need(hf: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise InteropError(f"{where}: missing key '{key}' (model_type bert)")
    return hf[key]


def check_exportable(m: ModelConfig) -> None:
    """Refuses, naming the key, a model whose architecture BERT cannot express."""
    if m.arch != "encoder":
        raise InteropError(
            "model: this is a decoder checkpoint (model.arch: decoder); BERT export needs an "
            "encoder checkpoint (bert_* presets, stage mlm/classify, or an imported BERT)"
        )
    want = dict(norm_position="post", norm="layernorm", mlp="gelu_exact", positions="learned")
    for key, value in want.items():
        if getattr(m, key) != value:
            raise InteropError(f"model.{key}: BERT needs {value}, this model has {getattr(m, key)}")
    if not m.use_bias or m.kv_heads != m.n_heads or m.head_size * m.n_heads != m.d_model:
        raise InteropError(
            "model: BERT needs biases, n_kv_heads = n_heads and head_dim = d_model / n_heads"
        )


def bert_config_json(
    m: ModelConfig, architecture: str, dtype: str, labels: list[str] | None, pad_id: int
) -> dict[str, Any]:
    """The config.json transformers' `from_pretrained` reads for this model."""
    check_exportable(m)
    conf: dict[str, Any] = {
        "model_type": "bert",
        "architectures": [architecture],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "intermediate_size": m.d_ff,
        "hidden_act": "gelu",
        "max_position_embeddings": m.max_seq_len,
        "type_vocab_size": max(m.type_vocab_size, 1),
        "layer_norm_eps": m.norm_eps,
        "hidden_dropout_prob": m.dropout,
        "attention_probs_dropout_prob": m.dropout,
        "position_embedding_type": "absolute",
        "pad_token_id": pad_id,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if labels is not None:
        conf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        conf["label2id"] = {name: i for i, name in enumerate(labels)}
    return conf


def labels_of(hf: dict[str, Any], num_labels: int, where: str) -> list[str]:
    """A classifier's label names in id order (`id2label`, else LABEL_i)."""
    raw = hf.get("id2label")
    if not raw:
        return [f"LABEL_{i}" for i in range(num_labels)]
    try:
        names = {int(k): str(v) for k, v in raw.items()}
    except (AttributeError, ValueError):
        raise InteropError(f"{where}: id2label must map label ids to names") from None
    if sorted(names) != list(range(num_labels)):
        raise InteropError(
            f"{where}: id2label has ids {sorted(names)} but classifier.weight has {num_labels} rows"
        )
    return [names[i] for i in range(num_labels)]


def bert_specs(
    m: ModelConfig,
    architecture: str,
    num_labels: int = 0,
    prefix: str | None = None,
    wrapped: bool | None = None,
) -> list[Spec]:
    """Every parameter `architecture` has, with its HF tensor. `prefix`: the base model's HF
    prefix (default: none for BertModel, `bert.` for the others); `wrapped`: our encoder is
    `.encoder` of a model with heads (default: when the architecture has heads)."""
    kind = ARCHITECTURES[architecture]
    wrapped = kind != "encoder" if wrapped is None else wrapped
    ours: Path_ = ("encoder",) if wrapped else ()
    p = ("" if kind == "encoder" else "bert.") if prefix is None else prefix
    out = _encoder_specs(m, ours, p, pooler=architecture != "BertForMaskedLM")
    d = m.d_model
    if kind == "pretrain":
        t = "cls.predictions.transform."
        out += [
            Spec(("mlm", "kernel"), (d, d), f"{t}dense.weight", (d, d), True),
            Spec(("mlm", "bias"), (d,), f"{t}dense.bias", (d,)),
            Spec(("mlm", "ln_scale"), (d,), f"{t}LayerNorm.weight", (d,)),
            Spec(("mlm", "ln_bias"), (d,), f"{t}LayerNorm.bias", (d,)),
            Spec(("mlm", "out_bias"), (m.vocab_size,), "cls.predictions.bias", (m.vocab_size,)),
        ]
    if architecture == "BertForPreTraining":
        out += [
            Spec(("nsp", "kernel"), (d, 2), "cls.seq_relationship.weight", (2, d), True),
            Spec(("nsp", "bias"), (2,), "cls.seq_relationship.bias", (2,)),
        ]
    if kind == "classifier":
        n = num_labels
        out += [
            Spec(("head", "kernel"), (d, n), "classifier.weight", (n, d), True),
            Spec(("head", "bias"), (n,), "classifier.bias", (n,)),
        ]
    return out


def _encoder_specs(m: ModelConfig, ours: Path_, p: str, pooler: bool) -> list[Spec]:
    d, n, h, f = m.d_model, m.n_heads, m.head_size, m.d_ff
    e = f"{p}embeddings."
    types = max(m.type_vocab_size, 1)
    out = [
        Spec((*ours, "embed", "embedding"), (m.vocab_size, d), f"{e}word_embeddings.weight",
             (m.vocab_size, d)),
        Spec((*ours, "pos_embed"), (m.max_seq_len, d), f"{e}position_embeddings.weight",
             (m.max_seq_len, d)),
        Spec((*ours, "type_embed"), (types, d), f"{e}token_type_embeddings.weight", (types, d)),
        Spec((*ours, "embed_norm", "scale"), (d,), f"{e}LayerNorm.weight", (d,)),
        Spec((*ours, "embed_norm", "bias"), (d,), f"{e}LayerNorm.bias", (d,)),
    ]  # fmt: skip
    for i in range(m.n_layers):
        b, a = (*ours, "blocks", i), f"{p}encoder.layer.{i}."
        for name, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            w = f"{a}attention.self.{theirs}."
            out.append(Spec((*b, "attn", name), (d, n, h), f"{w}weight", (n * h, d), True))
            out.append(Spec((*b, "attn", f"{name}_bias"), (n, h), f"{w}bias", (n * h,)))
        o, mid, last = f"{a}attention.output.", f"{a}intermediate.dense.", f"{a}output."
        out += [
            Spec((*b, "attn", "o"), (n, h, d), f"{o}dense.weight", (d, n * h), True),
            Spec((*b, "attn", "o_bias"), (d,), f"{o}dense.bias", (d,)),
            Spec((*b, "attn_norm", "scale"), (d,), f"{o}LayerNorm.weight", (d,)),
            Spec((*b, "attn_norm", "bias"), (d,), f"{o}LayerNorm.bias", (d,)),
            Spec((*b, "mlp", "up"), (d, f), f"{mid}weight", (f, d), True),
            Spec((*b, "mlp", "up_bias"), (f,), f"{mid}bias", (f,)),
            Spec((*b, "mlp", "down"), (f, d), f"{last}dense.weight", (d, f), True),
            Spec((*b, "mlp", "down_bias"), (d,), f"{last}dense.bias", (d,)),
            Spec((*b, "mlp_norm", "scale"), (d,), f"{last}LayerNorm.weight", (d,)),
            Spec((*b, "mlp_norm", "bias"), (d,), f"{last}LayerNorm.bias", (d,)),
        ]
    if pooler:
        out += [
            Spec((*ours, "pooler"), (d, d), f"{p}pooler.dense.weight", (d, d), True),
            Spec((*ours, "pooler_bias"), (d,), f"{p}pooler.dense.bias", (d,)),
        ]
    return out


def base_prefix(names: set[str], where: str) -> str:
    """`bert.` or "" (a BertModel saved alone, sentence-transformers' files)."""
    for prefix in ("bert.", ""):
        if f"{prefix}embeddings.word_embeddings.weight" in names:
            return prefix
    raise InteropError(
        f"{where}: missing tensor 'embeddings.word_embeddings.weight' (with or without 'bert.')"
    )


def checkpoint_specs(
    m: ModelConfig, architecture: str, num_labels: int, names: set[str], hf: dict[str, Any],
    where: str,
) -> list[Spec]:  # fmt: skip
    """The specs of the tensors this checkpoint holds for `architecture`'s model, as it spells
    them: the MLM bias may be saved only as `cls.predictions.decoder.bias`, LayerNorms as TF's
    `gamma`/`beta` (Google's converted checkpoints, bert-base-uncased's among them). A
    BertForMaskedLM's pooler and NSP head are read when saved (Google's checkpoints keep
    them), a BertModel's pooler likewise (sentence-transformers' may lack it); absent, those
    parameters start fresh."""
    kind = ARCHITECTURES[architecture]
    full = "BertForPreTraining" if kind == "pretrain" else architecture
    optional = {"pretrain": ("pooler", "pooler_bias", "nsp"), "encoder": ("pooler", "pooler_bias")}
    out = []
    for s in bert_specs(m, full, num_labels, base_prefix(names, where)):
        if s.hf not in names and _alias(s.hf) in names:
            s = Spec(s.ours, s.shape, _alias(s.hf), s.hf_shape, s.transpose)
        tail = s.ours[0] if s.ours[0] == "nsp" else s.ours[-1]
        if s.hf not in names and tail in optional.get(kind, ()):
            continue
        out.append(s)
    if kind == "pretrain" and hf.get("tie_word_embeddings") is False:
        raise InteropError(
            f"{where}: tie_word_embeddings: false is not supported (the MLM decoder is "
            "the word embedding)"
        )
    return out


def _alias(name: str) -> str:
    """Another spelling of tensor `name` that older checkpoints use."""
    if name == "cls.predictions.bias":
        return "cls.predictions.decoder.bias"
    for new, old in (
        (".LayerNorm.weight", ".LayerNorm.gamma"),
        (".LayerNorm.bias", ".LayerNorm.beta"),
    ):
        if name.endswith(new):
            return name[: -len(new)] + old
    return name


def ignored(name: str, specs: list[Spec]) -> bool:
    """A tensor the checkpoint may hold that no parameter needs."""
    if name.endswith(_IGNORED):
        return True
    # both spellings of the MLM bias saved (transformers ties them): the spec reads one
    return name == "cls.predictions.decoder.bias" and any(
        s.hf == "cls.predictions.bias" for s in specs
    )
