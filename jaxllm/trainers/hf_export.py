"""`stage: export` — a jaxllm checkpoint (`inputs.checkpoint`) → a HF model directory
(`hf.out_dir`, default `<run_dir>/hf`) that transformers' `from_pretrained` loads (a LoRA
checkpoint is merged into plain weights first; adapter, prefix and prompt checkpoints are
refused: a HF causal-LM directory has no place for them, and they cannot be merged); the
checkpoint's tokenizer is copied next to it when it is a HF `tokenizer.json` or a `.model`
(with a `tokenizer.json` made from it that gives the same ids: `tokenizer/spm_json.py`); a
tokenizer with jaxllm's chat tokens gets jaxllm's chat template in `tokenizer_config.json`.
Encoder checkpoints (and `hf.architecture: Bert*`) go to `bert_interop`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxllm.config import Config, MeshConfig
from jaxllm.errors import ConfigError
from jaxllm.interop import HF_TOKENIZER_FILES, infer_family
from jaxllm.interop.export import export_hf
from jaxllm.models.peft import merge_peft, methods_in
from jaxllm.models.quant import dequantize_model, is_quantized
from jaxllm.rundir import RunDir, atomic_write_json
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import END_TOKEN, ROLE_TOKENS
from jaxllm.trainers import require_input
from jaxllm.trainers.bert_interop import export_bert_checkpoint
from jaxllm.trainers.encoder_model import checkpoint_arch
from jaxllm.trainers.lm import load_frozen_model
from jaxllm.training.state import count_params


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    hf = cfg.hf  # type: ignore[attr-defined]
    out = Path(hf.out_dir).expanduser() if hf.out_dir else Path(run_dir.path) / "hf"
    ckpt = require_input(cfg, "checkpoint")
    if hf.architecture or checkpoint_arch(ckpt) == "encoder":
        return export_bert_checkpoint(ckpt, out, hf.dtype, cfg.mesh, hf.architecture, hf.dequantize)
    return export_checkpoint(ckpt, out, hf.dtype, cfg.mesh, dequantize=hf.dequantize)


def export_checkpoint(
    ckpt: Path, out: Path, dtype: str = "float32", mesh_cfg: MeshConfig | None = None,
    dequantize: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Loads the newest checkpoint in `ckpt` on the mesh of `mesh_cfg` (default: every
    device; with fsdp rules no device holds the whole model), LoRA adapters merged into the
    weights, and writes it to `out` (each weight gathered to the host in turn). A quantised
    checkpoint is refused unless `dequantize` (then scale * int, QLoRA adapters merged)."""
    mesh_cfg = mesh_cfg or MeshConfig()
    graphdef, state, _, m, meta = load_frozen_model(ckpt, make_mesh(mesh_cfg), mesh_cfg.rules)
    if is_quantized(state):
        if not dequantize:
            raise ConfigError(
                f"config key 'inputs.checkpoint': {ckpt} is quantised (int weights + scales), "
                "which HF safetensors of this family cannot hold; export its float source, or "
                "set hf.dequantize: true to write scale * int weights"
            )
        model = nnx.merge(graphdef, state)
        dequantize_model(model)
        merge_peft(model)
        state = nnx.state(model)
    left = [method.name for method in methods_in(state)]  # what merging could not fold in
    if left:
        raise ConfigError(
            f"config key 'inputs.checkpoint': {ckpt} was trained with peft.method {left[0]}, "
            "which cannot be merged into plain weights, so a HF model directory cannot hold "
            "it; export its base checkpoint, or fine-tune with lora (merged on export)"
        )
    ids = _special_ids(meta.get("tokenizer", ""))
    if not ids["config"]:  # an import without a tokenizer: the source model's own ids
        ids = {"config": meta.get("hf_special_ids", {})}
        ids["generation"] = ids["config"]
    export_hf(state, m, out, dtype, extra_config=ids["config"])
    if ids["generation"] and jax.process_index() == 0:
        atomic_write_json(out / "generation_config.json", ids["generation"])
    tokenizer = _copy_tokenizer(meta.get("tokenizer", ""), out)
    note = {}
    if tokenizer.endswith(".model"):
        note = _hf_tokenizer_files(Path(tokenizer), out, m.max_seq_len)
    return {
        **note,
        "params": count_params(state),
        "family": infer_family(m),
        "checkpoint_step": meta.get("step"),
        "dtype": dtype,
        "outputs": {"hf": str(out), "tokenizer": tokenizer},
    }


def _special_ids(path: str) -> dict[str, dict[str, Any]]:
    """The tokenizer's bos/eos/pad ids for config.json, and generation_config.json's: the
    source model's generation_config.json (kept with an imported tokenizer) with these ids,
    its eos a list of the EOS, the source's other eos ids (Llama-3-Instruct's
    `<|end_of_text|>`) and `<|end|>` where the tokenizer has the chat tokens (so `generate`
    stops at the end of an answer); without a tokenizer here, neither."""
    if not path or not Path(path).exists():
        return {"config": {}, "generation": {}}
    from jaxllm.interop import load_tokenizer

    tok = load_tokenizer(path)
    named = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    config = {k: v for k, v in named.items() if v >= 0}
    source = Path(path) / "generation_config.json"
    generation = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    generation.update(config)
    end = tok.special_ids.get(END_TOKEN)
    eos = [*getattr(tok, "eos_ids", [tok.eos_id]), *([end] if end is not None else [])]
    eos = list(dict.fromkeys(i for i in eos if i >= 0))
    if "eos_token_id" in config and len(eos) > 1:
        generation["eos_token_id"] = eos
    return {"config": config, "generation": generation}


def _hf_tokenizer_files(model: Path, out: Path, max_len: int) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json made from a jaxllm sentencepiece model (the same
    ids, and the chat template), so AutoTokenizer reads the export; a note when it cannot."""
    from jaxllm.tokenizer import Tokenizer
    from jaxllm.tokenizer.spm_json import convertible, write_hf_tokenizer

    tok = Tokenizer.load(model)
    why = convertible(tok)
    if why:
        note = f"{why}: AutoTokenizer cannot read it; load tokenizer.model with jaxllm.tokenizer"
        print(f"export: {note}")
        return {"tokenizer_note": note}
    if jax.process_index() == 0:
        write_hf_tokenizer(tok, out, max_len)
    return {}


def _copy_tokenizer(path: str, out: Path) -> str:
    """The checkpoint's tokenizer files into `out` (generation_config.json is the export's
    own); with jaxllm's chat tokens, jaxllm's chat template replaces the source's (ChatML,
    Llama-3 headers, or none) in tokenizer_config.json: the template it was fine-tuned on."""
    src = Path(path) if path else None
    if src is None or not src.exists():
        return ""
    if src.is_file():
        shutil.copyfile(src, out / src.name)
        return str(out / src.name)
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file() and name != "generation_config.json":
            shutil.copyfile(src / name, out / name)
    if jax.process_index() == 0:
        _write_chat_template(src, out)
    return str(out)


def _write_chat_template(src: Path, out: Path) -> None:
    """Sets `chat_template` (and bos/eos token names the config lacks, which the template
    renders) in `out/tokenizer_config.json` when the tokenizer in `src` has the chat tokens."""
    from jaxllm.interop import load_tokenizer
    from jaxllm.tokenizer.spm_json import CHAT_TEMPLATE

    tok = load_tokenizer(src)
    if not all(t in tok.special_ids for t in (*ROLE_TOKENS.values(), END_TOKEN)):
        return
    conf_path = out / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    for kind in ("bos", "eos"):
        tid = getattr(tok, f"{kind}_id")
        if f"{kind}_token" not in conf and tid >= 0:
            conf[f"{kind}_token"] = tok.id_to_piece(tid)
    conf["chat_template"] = CHAT_TEMPLATE
    atomic_write_json(conf_path, conf)
