"""An ELECTRA checkpoint (`mlm.objective: electra`) read by the stages that need only its
encoder: `load_encoder_model` rebuilds `ElectraPretrainModel` (its generator's MLM head does
not make it a BERT pretraining model), `embed` / dense retrieval embed with the discriminator,
`export` writes the discriminator as a BertModel whose hidden states transformers reproduces,
and a MaskedLM / PreTraining export is refused in one line. The checkpoint is written here
directly (a stage run takes ~30 s; `test_encoder_stages` runs one, marked slow)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, from_dict, to_dict
from jaxllm.errors import JaxllmError
from jaxllm.models.encoder import Encoder
from jaxllm.models.layers import ParamKeys
from jaxllm.sharding import make_mesh
from jaxllm.trainers.bert_interop import export_bert_checkpoint
from jaxllm.trainers.embedder import TextEmbedder
from jaxllm.trainers.encoder_model import load_encoder_model
from jaxllm.trainers.mlm import pretrain_model
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import create_train_state

MODEL = dict(preset="bert_tiny", d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
             positions="learned", dropout=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def electra_ckpt(tmp_path_factory, wp_tok) -> tuple[Path, dict]:
    """(checkpoint dir, its discriminator's weights by dotted path) of a fresh ELECTRA model
    with a 1-layer, d_ff 24 generator, saved as stage mlm saves it."""
    cfg = from_dict({"stage": "mlm", "model": {**MODEL, "vocab_size": wp_tok.vocab_size},
                     "mlm": {"objective": "electra", "nsp": False, "generator_layers": 1,
                             "generator_d_ff": 24}})  # fmt: skip
    m = cfg.model
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])

    def build():
        keys = ParamKeys(3)
        return pretrain_model(cfg, Encoder(m, rngs=keys), m, keys)

    tx = make_optimizer(cfg.train.optim, 10)
    graphdef, state, _ = create_train_state(build, tx, mesh, "dp", 3)
    # every weight random (LayerNorm scales around 1): a zero bias would hide a wrong mapping
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(tree, leaves))
    out = tmp_path_factory.mktemp("electra") / "checkpoints"
    meta = {"config": to_dict(cfg), "model": to_dict(m), "tokenizer": str(wp_tok.path),
            "head": {"kind": "electra"}}  # fmt: skip
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(1, state, meta)
    ckpt.close()
    model = nnx.merge(graphdef, state.params, state.frozen)
    enc = {
        ".".join(map(str, k)): np.asarray(v[...])
        for k, v in nnx.to_flat_state(nnx.state(model.encoder))
    }
    return out, enc


def test_electra_checkpoint_loads_with_its_generator_and_gives_its_discriminator(electra_ckpt):
    ckpt, enc = electra_ckpt
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    loaded = load_encoder_model(ckpt, mesh)  # was: "checkpoint has no parameter 'params.nsp.bias'"
    assert loaded.kind == "electra"
    model = nnx.merge(loaded.graphdef, loaded.state)
    assert len(model.generator.blocks) == 1 and model.generator.cfg.d_ff == 24
    got = {
        ".".join(map(str, k)): np.asarray(v[...])
        for k, v in nnx.to_flat_state(nnx.state(model.encoder))
    }
    assert got.keys() == enc.keys()
    assert all(np.array_equal(got[k], enc[k]) for k in enc)
    embedder = TextEmbedder.load(ckpt, mesh, max_len=32)  # embed and dense retrieval
    assert embedder.kind == "electra"
    assert embedder(["a short text", "another one"]).shape == (2, 32)


def test_electra_exports_its_discriminator_as_bert_model(electra_ckpt, wp_tok, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt, enc = electra_ckpt
    summary = export_bert_checkpoint(ckpt, tmp_path / "hf")  # default: BertModel
    assert summary["architecture"] == "BertModel"
    assert summary["params"] == sum(v.size for v in enc.values())  # the generator left out
    for arch in ("BertForMaskedLM", "BertForPreTraining"):
        with pytest.raises(JaxllmError, match=r"ELECTRA run.*export it as BertModel") as e:
            export_bert_checkpoint(ckpt, tmp_path / arch, architecture=arch)
        assert "\n" not in str(e.value)
    hf = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    ids = np.array([wp_tok.encode_pair("the first one", "and a second sentence")[0]])
    types = np.array([wp_tok.encode_pair("the first one", "and a second sentence")[1]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types)).last_hidden_state
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state = load_encoder_model(ckpt, mesh).encoder()
    ours = nnx.merge(graphdef, state)(
        jnp.asarray(ids), segment_ids_BL=jnp.ones_like(jnp.asarray(ids)),
        token_types_BL=jnp.asarray(types), deterministic=True,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref.numpy(), atol=1e-4)
