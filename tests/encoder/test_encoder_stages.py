"""`stage: mlm` and `stage: classify` end to end with a tiny encoder (a few steps each):
summaries, checkpoints that say `arch: encoder`, an exact resume, the classifier starting
from the pretrained encoder (its weights, not the MLM head's) or from random init, LoRA with
a training head, and `predictions.jsonl`."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, from_dict, read_yaml
from jaxllm.main import main
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.trainers import classify
from jaxllm.trainers.encoder import EncoderCheckpoint
from jaxllm.training.checkpoint import Checkpointer

from .conftest import ROOT, gz_rows, mlm_sets

SENTIMENT = ROOT / "jaxllm" / "assets" / "sentiment"


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_mlm_stage_summary_checkpoint_and_exact_resume(mlm_run, wp_tok, enc_data):
    s = summary(mlm_run)
    for key in ("mlm_accuracy", "nsp_accuracy", "mlm_loss", "nsp_loss"):
        assert s[f"val_{key}_before"] >= 0 and s[f"val_{key}_after"] >= 0
    assert s["val_mlm_loss_after"] < s["val_mlm_loss_before"]  # learns the unigram at least
    assert 0 <= s["val_unigram_mlm_accuracy"] < 1 and s["val_pairs"] == 16  # 2 eval batches
    meta = Checkpointer(mlm_run / "checkpoints", async_save=False).read_meta(4)
    assert meta["model"]["arch"] == "encoder" and meta["head"] == {"kind": "mlm"}
    assert Path(meta["tokenizer"]) == mlm_run / "tokenizer"  # kept in the run
    assert from_dict(meta["config"]).stage == "mlm"
    rows = [json.loads(x) for x in (mlm_run / "metrics.jsonl").read_text().splitlines()]
    assert {"mlm_loss", "nsp_accuracy", "mlm_correct"} <= set(rows[0])
    train_rows = [r for r in rows if "grad_norm" in r]
    assert len(train_rows) == 4 and all(0 <= r["mlm_accuracy"] <= 1 for r in train_rows)
    # killed after step 2: the run resumes there and reproduces steps 3-4 exactly
    shutil.rmtree(mlm_run / "checkpoints" / "4")
    (mlm_run / "summary.json").unlink()
    args = mlm_sets(mlm_run, enc_data, wp_tok.path)
    assert main(["--config", str(ROOT / "configs/tiny_mlm.yaml"), *args]) == 0
    again = summary(mlm_run)
    assert again["resumed_from_step"] == 2
    assert again["final_train_loss"] == s["final_train_loss"]
    assert again["val_mlm_accuracy_after"] == s["val_mlm_accuracy_after"]


@pytest.mark.slow  # no shipped config uses ELECTRA; its pieces have fast tests (test_encoder_losses)
def test_electra_stage_and_the_classifier_reads_its_discriminator(tmp_path, wp_tok, enc_data):
    out = tmp_path / "el"
    args = mlm_sets(out, enc_data, wp_tok.path, steps=2)
    args += ["--set", "mlm.nsp=false", "--set", "mlm.objective=electra"]
    assert main(["--config", str(ROOT / "configs/tiny_mlm.yaml"), *args]) == 0
    s = summary(out)
    assert s["val_disc_loss_after"] < s["val_disc_loss_before"]  # 2 steps learn the base rate
    assert 0 < s["val_replaced_share_after"] < 0.3  # ~15 % chosen, nearly all replaced
    meta = Checkpointer(out / "checkpoints", async_save=False).read_meta(2)
    assert meta["head"] == {"kind": "electra"}
    saved = Checkpointer(out / "checkpoints", async_save=False)
    params = saved.manager.item_metadata(2)["state"]["params"]
    assert {"encoder", "generator", "mlm", "rtd_kernel"} <= set(params)
    assert "embed" not in params["generator"]  # shared: stored once, under the encoder
    assert len(params["generator"]["blocks"]) == 1
    # what classify / embed read: the discriminator, its embeddings those the generator used
    src = EncoderCheckpoint(out / "checkpoints")
    enc = src.restore(src.model, make_mesh(MeshConfig()), "dp")  # reads `encoder.` alone
    assert enc.cfg.n_layers == 1 and enc.embed.embedding[...].shape[0] == src.model.vocab_size


def sentiment_cut(tmp_path: Path, n: int = 48) -> dict[str, str]:
    """Small train/val/test files cut from the shipped sentiment set."""
    files = {}
    for split, count in (("train", n), ("val", 20), ("test", 18)):
        rows = gz_rows(SENTIMENT / f"{split}.jsonl.gz", count)
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[f"classify.{split}_file"] = str(path)
    return files


def classify_config(ckpt: Path, out: Path, files: dict, **sets):
    raw = read_yaml(ROOT / "configs/tiny_classify.yaml")
    raw.update(name="cls", output_dir=str(out), progress=False)
    raw["inputs"]["checkpoint"] = str(ckpt)
    raw["loader"] = {"seq_len": 32, "batch_size": 8}
    raw["train"].update(steps=4, eval_every=4, checkpoint_every=2, log_every=1)
    cfg = from_dict(raw)
    from jaxllm.config import replace

    return replace(cfg, **files, **sets)


def run_classify(cfg) -> dict:
    run_dir = RunDir.open(cfg)
    return run_dir.finish(classify.run(cfg, run_dir))


def encoder_weights(ckpt: Path) -> dict:
    src = EncoderCheckpoint(ckpt)
    enc = src.restore(src.model, make_mesh(from_dict({"stage": "mlm"}).mesh), "dp")
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(enc))}


def test_classify_from_the_pretrained_encoder(mlm_run, tmp_path):
    files = sentiment_cut(tmp_path)
    s = run_classify(classify_config(mlm_run / "checkpoints", tmp_path / "c", files))
    assert s["labels"] == ["negative", "positive"] and s["examples"] == {
        "train": 48, "val": 20, "test": 18
    }  # fmt: skip
    for key in ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1"):
        assert 0.0 <= s[key] <= 1.0
    assert np.sum(s["test_confusion"]) == 18 and len(s["val_confusion"]) == 2
    assert s["trainable_params"] == s["total_params"]
    preds = [json.loads(x) for x in (tmp_path / "c/predictions.jsonl").read_text().splitlines()]
    assert [p["split"] for p in preds] == ["val"] * 20 + ["test"] * 18
    assert preds[0]["line"] == 1 and set(preds[0]["probabilities"]) == {"negative", "positive"}
    test_acc = np.mean([p["label"] == p["prediction"] for p in preds if p["split"] == "test"])
    assert round(test_acc, 4) == s["test_accuracy"]  # the summary rounds to 4 places
    # the classifier's encoder started from the MLM run's encoder: same weights at step 0
    meta = Checkpointer(tmp_path / "c/checkpoints", async_save=False).read_meta(4)
    assert meta["head"]["labels"] == ["negative", "positive"]
    assert meta["base_checkpoint"] == str(mlm_run / "checkpoints")
    pre, tuned = (
        encoder_weights(mlm_run / "checkpoints"),
        encoder_weights(tmp_path / "c/checkpoints"),
    )
    assert pre.keys() == tuned.keys() and any(not np.array_equal(pre[k], tuned[k]) for k in pre)


def saved_leaf(ckpt: Path, step: int, *path: str) -> np.ndarray:
    """One saved weight (e.g. "head", "kernel") read alone from a checkpoint."""
    c = Checkpointer(ckpt, async_save=False)
    meta = c.manager.item_metadata(step)["state"]["params"]
    for p in path:
        meta = meta[p]
    sds = jax.ShapeDtypeStruct(
        tuple(meta["value"].shape),
        meta["value"].dtype,
        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    target: dict = {"value": sds}
    for p in reversed(path):
        target = {p: target}
    out = c.restore_params(step, target)[0]
    for p in path:
        out = out[p]
    return np.asarray(out["value"])


@pytest.mark.slow  # the random-init path also runs in test_bert_pipeline (slow)
def test_classify_random_init_and_lora_head_trains(mlm_run, tmp_path):
    files = sentiment_cut(tmp_path, 24)
    cfg = classify_config(mlm_run / "checkpoints", tmp_path / "r", files,
                          **{"classify.init": "random", "seed": 1,
                             "classify.pooling": "mean"})  # fmt: skip
    s = run_classify(cfg)
    assert s["init"] == "random"
    # a mean-pooled classifier is not a BertForSequenceClassification (that pools [CLS])
    from jaxllm.interop import InteropError
    from jaxllm.trainers.bert_interop import export_bert_checkpoint

    with pytest.raises(InteropError, match="classify.pooling"):
        export_bert_checkpoint(tmp_path / "r/checkpoints", tmp_path / "hf")
    meta = Checkpointer(tmp_path / "r/checkpoints", async_save=False).read_meta(4)
    assert not meta.get("base_checkpoint") and meta["model"]["d_model"] == 32
    pre = encoder_weights(mlm_run / "checkpoints")
    fresh = encoder_weights(tmp_path / "r/checkpoints")
    key = ("embed", "embedding")
    assert not np.allclose(pre[key], fresh[key], atol=0.01)  # not the pretrained weights
    # (with the mlm run's seed, init: random starts where pretraining started)
    lora = {"peft.method": "lora", "peft.rank": 2, "peft.targets": (r"attn\.(q|v)$",)}
    s = run_classify(classify_config(mlm_run / "checkpoints", tmp_path / "l", files, **lora))
    assert 0 < s["trainable_params"] < s["total_params"]
    saved = Checkpointer(tmp_path / "l/checkpoints", async_save=False).manager
    params = saved.item_metadata(4)["state"]["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params["encoder"])[0]
    names = {str(path[-2].key) for path, _ in leaves}
    assert names == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"}  # only adapters...
    assert set(params["head"]) == {"kernel", "bias"}  # ...and the head, which trains
    ckpt = tmp_path / "l/checkpoints"
    assert not np.array_equal(saved_leaf(ckpt, 2, "head", "kernel"),
                              saved_leaf(ckpt, 4, "head", "kernel"))  # fmt: skip


@pytest.mark.slow  # its own BERT-shaped MLM run (learned positions: exportable), ~1.5 min
def test_lora_classify_run_exports_and_embeds(wp_tok, enc_data, tmp_path):
    """A LoRA classify run's checkpoint (adapters + head, its base an MLM run) loads whole:
    exported, transformers' BertForSequenceClassification gives the probabilities the stage
    wrote in predictions.jsonl; embedded, its encoder carries the adapters (not the base's).
    A QLoRA run (int8 base) exports only with hf.dequantize, then the same way."""
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.bert_interop import export_bert_checkpoint
    from jaxllm.trainers.embedder import TextEmbedder

    mlm = tmp_path / "mlm"
    sets = [*mlm_sets(mlm, enc_data, wp_tok.path, steps=2), "--set", "model.positions=learned"]
    assert main(["--config", str(ROOT / "configs/tiny_mlm.yaml"), *sets]) == 0
    base = mlm / "checkpoints"
    files = sentiment_cut(tmp_path, 24)
    lora = {"peft.method": "lora", "peft.rank": 2, "peft.targets": (r"attn\.(q|v)$",),
            "classify.pooling": "cls", "train.optim.lr": 0.05}  # fmt: skip
    run_classify(classify_config(base, tmp_path / "l", files, **lora))
    ckpt = tmp_path / "l/checkpoints"
    export_bert_checkpoint(ckpt, tmp_path / "hf_lora")
    texts = [json.loads(x)["text"] for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert_hf_probabilities(tmp_path / "hf_lora", ckpt.parent / "predictions.jsonl", texts)
    mesh = make_mesh(from_dict({"stage": "embed"}).mesh)
    tuned = TextEmbedder.load(ckpt, mesh)
    plain = TextEmbedder.load(base, mesh)
    a, b = tuned(texts[:4]), plain(texts[:4])
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-6)

    run_classify(
        classify_config(base, tmp_path / "q", files, **lora, **{"quantize.method": "int8"})
    )
    qckpt = tmp_path / "q/checkpoints"
    with pytest.raises(ConfigError, match="hf.dequantize"):
        export_bert_checkpoint(qckpt, tmp_path / "hf_q")
    export_bert_checkpoint(qckpt, tmp_path / "hf_q", dequantize=True)
    assert_hf_probabilities(tmp_path / "hf_q", qckpt.parent / "predictions.jsonl", texts)


def assert_hf_probabilities(hf_dir: Path, predictions: Path, texts: list[str]) -> None:
    """transformers' BertForSequenceClassification from `hf_dir` gives the test split's
    probabilities of a classify run's predictions.jsonl (rounded there)."""
    import torch
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    preds = [json.loads(x) for x in predictions.read_text().splitlines()]
    test = [p for p in preds if p["split"] == "test"]
    enc = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(hf(**enc).logits, -1).numpy()
    order = [hf.config.id2label[i] for i in range(probs.shape[1])]
    ours = np.array([[p["probabilities"][name] for name in order] for p in test])
    np.testing.assert_allclose(probs, ours, atol=2e-4)


@pytest.mark.slow
def test_classify_keep_best_scores_and_hands_on_the_best_evaluation(mlm_run, tmp_path):
    from jaxllm.config import replace

    files = sentiment_cut(tmp_path, 16)
    cfg = classify_config(mlm_run / "checkpoints", tmp_path / "b", files)
    es = replace(cfg.train.early_stopping, metric="loss", mode="min")
    cfg = replace(cfg, **{"train.keep_best": True, "train.eval_every": 1,
                          "train.early_stopping": es, "train.optim.lr": 0.05})  # fmt: skip
    s = run_classify(cfg)
    evals = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["eval_loss"] for e in evals if "eval_loss" in e}
    best = min(losses, key=losses.get)
    assert s["best_step"] == best and s["outputs"]["checkpoint"].endswith("/b/best")
    # the summary's val figures are the best state's, not the last step's
    assert abs(s["val_loss"] - losses[best]) < 1e-4


def saved_names(ckpt: Path, step: int) -> set[str]:
    params = Checkpointer(ckpt, async_save=False).manager.item_metadata(step)["state"]["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(str(p.key) for p in path[:-1]) for path, _ in leaves}


@pytest.mark.slow  # ~25 s under load: an evaluation per step
def test_classify_prefix_tuning_folds_its_mlp_and_keeps_the_best(mlm_run, tmp_path):
    """peft.method prefix through its MLP: the head trains with the prefixes, the last and
    the best checkpoints hold the folded prefixes (no MLP), and the summary's val figures
    are the best evaluation's, scored through the folded model."""
    from jaxllm.config import replace

    files = sentiment_cut(tmp_path, 16)
    cfg = classify_config(mlm_run / "checkpoints", tmp_path / "p", files)
    es = replace(cfg.train.early_stopping, metric="loss", mode="min")
    cfg = replace(cfg, **{
        "train.keep_best": True, "train.eval_every": 1, "train.early_stopping": es,
        "train.steps": 3, "train.checkpoint_every": 2,
        "train.optim.lr": 0.05, "peft.method": "prefix", "peft.num_virtual_tokens": 2,
        "peft.prefix_projection": True, "peft.prefix_hidden": 8,
    })  # fmt: skip
    s = run_classify(cfg)
    assert 0 < s["trainable_params"] < s["total_params"]
    ckpts = tmp_path / "p/checkpoints"
    assert saved_names(ckpts, 2) >= {"encoder.prefix.w1", "head.kernel"}  # resumable: the MLP
    assert saved_names(ckpts, 3) == {"encoder.prefix.kv", "head.kernel", "head.bias"}
    assert Checkpointer(ckpts, async_save=False).read_meta(3)["peft_folded"]
    best = Path(s["outputs"]["checkpoint"])
    step = Checkpointer(best, async_save=False).latest_step()
    assert step == s["best_step"] and saved_names(best, step) == saved_names(ckpts, 3)
    evals = [json.loads(x) for x in (tmp_path / "p/metrics.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["eval_loss"] for e in evals if "eval_loss" in e}
    assert abs(s["val_loss"] - losses[s["best_step"]]) < 1e-4


@pytest.mark.slow  # ~12 s under load
def test_classify_adapters_train_only_themselves_and_the_head(mlm_run, tmp_path):
    files = sentiment_cut(tmp_path, 16)
    sets = {"peft.method": "adapter", "peft.adapter_dim": 4}
    s = run_classify(classify_config(mlm_run / "checkpoints", tmp_path / "a", files, **sets))
    assert 0 < s["trainable_params"] < s["total_params"]
    rest = saved_names(tmp_path / "a/checkpoints", 4) - {"head.kernel", "head.bias"}
    assert rest and all("_adapter." in n for n in rest)  # no base weight is saved
    from jaxllm.interop import InteropError
    from jaxllm.trainers.bert_interop import export_bert_checkpoint

    with pytest.raises(InteropError, match="peft.method adapter"):  # it loads, cannot merge
        export_bert_checkpoint(tmp_path / "a/checkpoints", tmp_path / "hf")


@pytest.mark.slow
def test_classify_p_tuning_saves_the_folded_prompt_last(mlm_run, tmp_path):
    """peft.method prompt through P-tuning's MLP: the head trains with it; step 2 keeps the
    MLP (to resume), the last step holds the folded prompt embeddings (the loop's
    final_save, as in sft)."""
    files = sentiment_cut(tmp_path, 16)
    sets = {"peft.method": "prompt", "peft.num_virtual_tokens": 3,
            "peft.prompt_encoder": "mlp", "peft.prompt_hidden": 8}  # fmt: skip
    s = run_classify(classify_config(mlm_run / "checkpoints", tmp_path / "a", files, **sets))
    assert 0 < s["trainable_params"] < s["total_params"]
    ckpts = tmp_path / "a/checkpoints"
    assert saved_names(ckpts, 2) >= {"encoder.prompt.w1", "encoder.prompt.embedding"}
    assert saved_names(ckpts, 4) == {"encoder.prompt.embedding", "head.kernel", "head.bias"}
    assert Checkpointer(ckpts, async_save=False).read_meta(4)["peft_folded"]
