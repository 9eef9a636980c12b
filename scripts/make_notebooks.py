"""Writes notebooks/*.ipynb (outputs empty) from the cells below: edit here, then run
`python scripts/make_notebooks.py [OUT_DIR]`. tests/test_notebooks.py executes every notebook on CPU
with tiny settings (JAXLLM_NOTEBOOK_SMOKE=1), so they never rot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks"
COLAB = "https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
REPO = "jaxllm/jaxllm"  # owner/name of the repository Colab opens (a fork: change it here)

SETUP = (
    r"""# Setup. On Colab: clone jaxllm and install it (jax for the runtime's accelerator first, so
# that installing jaxllm does not replace it with a CPU build). Elsewhere: the installed package.
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/"""
    + REPO
    + r'''.git"  # your fork, if you use one
NOTEBOOK = "@NOTEBOOK@"  # runs go to runs/notebooks/<NOTEBOOK>/<stage>/


def colab_accelerator(env=os.environ, dev=Path("/dev")) -> str:
    """The jax extra for this runtime: "tpu" (v2-v4: COLAB_TPU_ADDR or /dev/accel*; v5e/v6e:
    TPU_ACCELERATOR_TYPE or /dev/vfio/<group>), "cuda12" (/dev/nvidia0), or "" (CPU)."""
    vfio_groups = [p for p in (dev / "vfio").glob("*") if p.name.isdigit()]
    if env.get("COLAB_TPU_ADDR") or env.get("TPU_ACCELERATOR_TYPE") or vfio_groups or (
            any(dev.glob("accel[0-9]*"))):
        return "tpu"
    return "cuda12" if (dev / "nvidia0").exists() else ""


if "google.colab" in sys.modules:
    if not Path("jaxllm").exists():
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "jaxllm"], check=True)
    accel = colab_accelerator()
    if accel:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-U", f"jax[{accel}]"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "jaxllm"], check=True)
    sys.path.insert(0, str(Path("jaxllm").resolve()))

import jax
import yaml

import jaxllm
from jaxllm.config import load_config, to_dict
from jaxllm.main import main
from jaxllm.rundir import first_difference

ROOT = Path(jaxllm.__file__).resolve().parents[1]  # the checkout: configs/ and the shipped data
WORK = Path(os.environ.get("JAXLLM_NOTEBOOK_DIR", "runs/notebooks")).resolve() / NOTEBOOK
SMOKE = os.environ.get("JAXLLM_NOTEBOOK_SMOKE") == "1"  # the test suite's tiny settings
BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu": sizes below follow it


def steps(cpu: int, accelerator: int) -> int:
    """Training steps for this runtime: a few in the test suite, more where it is fast."""
    return 4 if SMOKE else (cpu if BACKEND == "cpu" else accelerator)


def _strings(tree) -> list:
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


def run(config: str, name: str, *sets: str) -> dict:
    """One stage, as `python -m jaxllm.main --config configs/<config> --set ...`; its summary.
    Run again ("Run all" twice), a finished stage is reused when its config is the same and no
    run it reads (a folder of WORK) finished after it started; otherwise it runs again, over
    the old one (overwrite=true). An interrupted stage with the same config resumes."""
    out = WORK / name
    sets = (f"output_dir={out}", *sets)
    old_file = out / "config.yaml"
    if old_file.is_file():
        old = yaml.safe_load(old_file.read_text(encoding="utf-8")) or {}
        same = first_difference(old, to_dict(load_config(ROOT / "configs" / config, sets))) is None
        inputs = {WORK / Path(s).relative_to(WORK).parts[0] for s in _strings(old)
                  if s.startswith(f"{WORK}{os.sep}")} - {out}
        stale = any((d / "summary.json").is_file() and (d / "summary.json").stat().st_mtime
                    > old_file.stat().st_mtime for d in inputs)
        finished = (out / "summary.json").is_file()
        if finished and same and not stale:
            print(f"{name}: reusing the finished run in {out} (delete it to run the stage again)")
            return json.loads((out / "summary.json").read_text())
        if finished or not same or stale:
            sets += ("overwrite=true",)
    args = ["--config", str(ROOT / "configs" / config)]
    for s in sets:
        args += ["--set", s]
    if main(args) != 0:
        raise RuntimeError(f"{config} failed: see the error above")
    return json.loads((out / "summary.json").read_text())


print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind} ({BACKEND}); "
      f"runs in {WORK}{'; smoke settings' if SMOKE else ''}")
'''
)


def setup(notebook: str) -> str:
    """The first code cell of `notebook`: its runs go to runs/notebooks/<notebook>/."""
    return SETUP.replace("@NOTEBOOK@", notebook)


def badge(name: str) -> str:
    url = COLAB.format(repo=REPO, name=name)
    return f'<a href="{url}"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>'


def quickstart() -> list:
    return [
        new_markdown_cell(
            f"{badge('quickstart.ipynb')}\n\n# jaxllm quickstart: raw text → a chat model\n\n"
            "The whole tiny pipeline of `make demo`, one stage per cell: clean the shipped corpus, "
            "train a BPE tokenizer, pretrain a 3.3 M-parameter GPT, sample from it, then fine-tune "
            "it on chat data. Every cell is the same command as `python -m jaxllm.main --config "
            "configs/<stage>.yaml`; each run writes `runs/notebooks/quickstart/<name>/` (summary, "
            "metrics, loss plot, checkpoints); run again, a finished stage with the same settings is "
            "reused. Runs on CPU in a few minutes; on a Colab TPU or GPU it "
            "trains longer in the same time."
        ),
        new_code_cell(setup("quickstart")),
        new_markdown_cell("## 1. Data and tokenizer"),
        new_code_cell(
            'data = run("tiny_data.yaml", "data")\n'
            'print({k: data[k] for k in ("train_docs", "val_docs")})\n'
            'tok = run("tiny_tokenizer.yaml", "tokenizer", f"inputs.data_dir={WORK / \'data\'}")\n'
            'print("tokens per character:", tok["tokens_per_char"])'
        ),
        new_markdown_cell("## 2. Pretrain a small GPT and look at its loss"),
        new_code_cell(
            "from IPython.display import Image, display\n\n"
            'pre = run("tiny_pretrain.yaml", "pretrain",\n'
            "          f\"inputs.data_dir={WORK / 'data'}\",\n"
            "          f\"inputs.tokenizer={WORK / 'tokenizer' / 'tokenizer.model'}\",\n"
            '          f"train.steps={steps(300, 2000)}", "train.eval_every=100", "train.eval_batches=4")\n'
            'print("val loss", pre.get("val_loss"), "vs unigram", pre.get("unigram_val_loss"))\n'
            'if (WORK / "pretrain" / "loss.png").exists():\n'
            '    display(Image(str(WORK / "pretrain" / "loss.png")))'
        ),
        new_markdown_cell("## 3. Sample from it (KV-cache sampler)"),
        new_code_cell(
            'run("tiny_generate.yaml", "generate", f"inputs.checkpoint={WORK / \'pretrain\' / \'checkpoints\'}",\n'
            '    f"generate.max_new_tokens={8 if SMOKE else 48}")\n'
            'for line in (WORK / "generate" / "generations.jsonl").read_text().splitlines():\n'
            "    g = json.loads(line)\n"
            '    print(repr(g["prompt"]), "→", repr(g["completion"]))'
        ),
        new_markdown_cell(
            "## 4. Supervised fine-tuning with the chat template\n\nThe loss counts the "
            "assistant's tokens only; the summary holds greedy answers before and after."
        ),
        new_code_cell(
            'sft = run("tiny_sft.yaml", "sft", f"inputs.checkpoint={WORK / \'pretrain\' / \'checkpoints\'}",\n'
            '          f"train.steps={steps(200, 1000)}", f"sft.eval_examples={4 if SMOKE else 64}",\n'
            '          f"sft.eval_max_new_tokens={8 if SMOKE else 48}")\n'
            'print("answer-token val loss", sft["val_loss_before"], "→", sft["val_loss_after"])\n'
            'for s in sft.get("samples_after", [])[:4]:\n'
            "    print(s)"
        ),
    ]


def byo_model() -> list:
    return [
        new_markdown_cell(
            f"{badge('bring_your_own_model.ipynb')}\n\n# Bring your own model: import → LoRA SFT → "
            "chat → export\n\nImport a Hugging Face Llama / Qwen2 / GPT-2 directory, add the chat "
            "tokens to its tokenizer, fine-tune LoRA adapters on chat data, talk to it, and export "
            "merged weights that `transformers` loads. Set `HF_MODEL` to a local model directory "
            '(on Colab: `from huggingface_hub import snapshot_download; HF_MODEL = snapshot_download("Qwen/Qwen2-0.5B")`). '
            "Left empty, the notebook builds a small random-weight Llama with `transformers`, so it "
            "runs anywhere without a download."
        ),
        new_code_cell(setup("bring_your_own_model")),
        new_code_cell(
            'HF_MODEL = os.environ.get("HF_MODEL", "")  # a local HF model directory; empty: a random tiny Llama\n'
            "if not HF_MODEL:\n"
            "    import torch\n"
            "    import transformers\n"
            "    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers\n\n"
            '    rows = [json.loads(line) for line in (ROOT / "jaxllm/assets/sft/train.jsonl").open()]\n'
            '    texts = [r["response"] for r in rows if "response" in r][:800]\n'
            '    tok = Tokenizer(models.BPE(unk_token="<unk>"))\n'
            "    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)\n"
            "    tok.decoder = decoders.ByteLevel()\n"
            '    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))\n'
            "    torch.manual_seed(0)\n"
            "    conf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,\n"
            "        num_attention_heads=4, num_key_value_heads=2, vocab_size=tok.get_vocab_size(),\n"
            "        max_position_embeddings=256, bos_token_id=1, eos_token_id=2)\n"
            '    HF_MODEL = str(WORK / "hf_random_llama")\n'
            "    transformers.LlamaForCausalLM(conf).save_pretrained(HF_MODEL)\n"
            '    tok.save(f"{HF_MODEL}/tokenizer.json")\n'
            '    Path(HF_MODEL, "tokenizer_config.json").write_text(json.dumps(\n'
            '        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))\n'
            'print("model:", HF_MODEL)'
        ),
        new_markdown_cell("## Import, with the chat template's tokens added"),
        new_code_cell(
            'imp = run("hf_import.yaml", "import", f"hf.path={HF_MODEL}", "hf.chat_tokens=true")\n'
            'print({k: imp[k] for k in ("params", "vocab_size", "chat_tokens_added") if k in imp})'
        ),
        new_markdown_cell(
            "## LoRA fine-tuning\n\nOnly the rank-16 adapters train (the summary counts them); "
            "the checkpoint holds the adapters and names its base."
        ),
        new_code_cell(
            'lora = run("hf_sft_lora.yaml", "lora", f"inputs.checkpoint={WORK / \'import\' / \'checkpoints\'}",\n'
            '           f"train.steps={steps(100, 300)}", "loader.seq_len=128", "loader.batch_size=8",\n'
            '           "mesh.fsdp=1", "mesh.data=-1", "mesh.rules=dp",\n'
            '           f"sft.eval_examples={4 if SMOKE else 32}", f"sft.eval_max_new_tokens={8 if SMOKE else 48}")\n'
            'print(lora["trainable_params"], "of", lora["total_params"], "parameters trained;",\n'
            '      "val loss", lora["val_loss_before"], "→", lora["val_loss_after"])'
        ),
        new_markdown_cell("## Chat with it"),
        new_code_cell(
            "from jaxllm.tokenizer.chat import render_text\n\n"
            'questions = ["What should we eat on New Year\'s Eve?", "My order has not arrived. What can I do?"]\n'
            'prompts = [render_text([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]\n'
            'run("tiny_generate.yaml", "chat", f"inputs.checkpoint={WORK / \'lora\' / \'checkpoints\'}",\n'
            '    f"generate.prompts={json.dumps(prompts)}", "generate.temperature=0", "generate.add_bos=false",\n'
            '    f"generate.max_new_tokens={8 if SMOKE else 64}", "generate.stop=[\\"<|end|>\\"]")\n'
            'for line in (WORK / "chat" / "generations.jsonl").read_text().splitlines():\n'
            "    g = json.loads(line)\n"
            '    print("Q:", g["prompt"][-60:].strip(), "\\nA:", g["completion"].strip(), "\\n")'
        ),
        new_markdown_cell(
            "## Export merged weights for `transformers`\n\nThe adapters are folded into the "
            "weights; `transformers` loads the directory and gives the same logits."
        ),
        new_code_cell(
            'exp = run("hf_export.yaml", "export", f"inputs.checkpoint={WORK / \'lora\' / \'checkpoints\'}",\n'
            "          f\"hf.out_dir={WORK / 'export' / 'hf'}\")\n"
            'print(sorted(p.name for p in Path(exp["outputs"]["hf"]).iterdir()))\n\n'
            "import numpy as np\n"
            "import torch\n"
            "import transformers\n"
            "from flax import nnx\n\n"
            "from jaxllm.config import MeshConfig\n"
            "from jaxllm.sharding import make_mesh\n"
            "from jaxllm.trainers.lm import load_checkpoint_model\n\n"
            "mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])\n"
            'g, state, _, _ = load_checkpoint_model(WORK / "lora" / "checkpoints", mesh)\n'
            "ids = np.array([[1, 5, 9, 17, 33, 60]])\n"
            "ours = np.asarray(nnx.merge(g, state)(ids))\n"
            'hf = transformers.AutoModelForCausalLM.from_pretrained(exp["outputs"]["hf"]).eval()\n'
            "with torch.no_grad():\n"
            "    theirs = hf(torch.tensor(ids)).logits.float().numpy()\n"
            'print("max |logit difference|, jaxllm (LoRA unmerged) vs transformers (merged):",\n'
            "      float(np.abs(ours - theirs).max()))"
        ),
    ]


def alignment() -> list:
    chain = (
        "base = dict(data=f\"inputs.data_dir={WORK / 'data'}\",\n"
        "            tok=f\"inputs.tokenizer={WORK / 'tokenizer' / 'tokenizer.model'}\")\n"
        'run("tiny_data.yaml", "data")\n'
        'run("tiny_tokenizer.yaml", "tokenizer", base["data"])\n'
        'run("tiny_pretrain.yaml", "pretrain", base["data"], base["tok"], f"train.steps={steps(300, 2000)}",\n'
        '    "train.eval_batches=2")\n'
        'sft = run("tiny_sft.yaml", "sft", f"inputs.checkpoint={WORK / \'pretrain\' / \'checkpoints\'}",\n'
        '          f"train.steps={steps(200, 1000)}", f"sft.eval_examples={4 if SMOKE else 64}",\n'
        '          f"sft.eval_max_new_tokens={8 if SMOKE else 48}")\n'
        "SFT = f\"inputs.checkpoint={WORK / 'sft' / 'checkpoints'}\"\n"
        "\n"
        "def VAL(section: str) -> str:\n"
        '    """The held-out preference set (in the test suite: its first 24 lines)."""\n'
        "    if not SMOKE:\n"
        '        return f"{section}.val_file=asset:preference/val.jsonl"\n'
        '    small = WORK / "val_small.jsonl"\n'
        '    lines = (ROOT / "jaxllm/assets/preference/val.jsonl").read_text().splitlines()[:24]\n'
        '    small.write_text("\\n".join(lines) + "\\n")\n'
        '    return f"{section}.val_file={small}"\n'
        'print("SFT answer-token val loss", sft["val_loss_before"], "→", sft["val_loss_after"])'
    )
    return [
        new_markdown_cell(
            f"{badge('alignment.ipynb')}\n\n# Alignment: reward model, DPO, KTO, PPO, online DPO "
            "and GRPO\n\n"
            "From a small chat model (pretrained and fine-tuned here first), the alignment stages "
            "on the shipped preference and arithmetic sets: a Bradley–Terry reward model, DPO "
            "against a frozen reference, KTO on unpaired good/bad marks, PPO and online DPO "
            "against the reward model, and GRPO with a rule reward (the exact answer). Each "
            "prints its held-out figures before and after."
        ),
        new_code_cell(setup("alignment")),
        new_markdown_cell("## A chat model to align"),
        new_code_cell(chain),
        new_markdown_cell("## Reward model (held-out pair accuracy)"),
        new_code_cell(
            'rm = run("tiny_reward.yaml", "reward", SFT, f"train.steps={steps(200, 600)}", VAL("reward"))\n'
            "print({k: v for k, v in rm.items() if k.startswith(('pair_accuracy', 'prompt_accuracy'))})"
        ),
        new_markdown_cell("## DPO"),
        new_code_cell(
            'dpo = run("tiny_dpo.yaml", "dpo", SFT, f"train.steps={steps(100, 400)}", VAL("dpo"))\n'
            "print({k: v for k, v in dpo.items() if 'accuracy' in k or 'margin' in k})"
        ),
        new_markdown_cell(
            "## KTO on unpaired feedback\n\nOne answer per prompt marked good or bad (the shipped "
            "`feedback_*.jsonl`), no pairs: the held-out `reward_auc` is how well the implicit "
            "reward ranks good answers above bad ones."
        ),
        new_code_cell(
            'kto = run("tiny_kto.yaml", "kto", SFT, f"train.steps={steps(100, 400)}")\n'
            "print({k: v for k, v in kto.items() if 'auc' in k or 'reward_' in k})"
        ),
        new_markdown_cell(
            "## PPO against the reward model\n\nThe reward curve comes from the run's "
            "`metrics.jsonl`; the summary compares greedy answers on held-out prompts."
        ),
        new_code_cell(
            "import matplotlib.pyplot as plt\n\n"
            'ppo = run("tiny_ppo.yaml", "ppo", SFT, f"inputs.reward_checkpoint={WORK / \'reward\' / \'checkpoints\'}",\n'
            '          f"ppo.iterations={2 if SMOKE else 30}", f"ppo.eval_examples={4 if SMOKE else 64}")\n'
            'rows = [json.loads(line) for line in (WORK / "ppo" / "metrics.jsonl").read_text().splitlines()]\n'
            'rows = [r for r in rows if "reward" in r]\n'
            'plt.plot([r["step"] for r in rows], [r["reward"] for r in rows])\n'
            'plt.xlabel("iteration")\n'
            'plt.ylabel("reward")\n'
            "plt.show()\n"
            "print({k: v for k, v in ppo.items() if isinstance(v, (int, float))})"
        ),
        new_markdown_cell(
            "## Online DPO judged by the reward model\n\nEight answers per prompt, the reward "
            "model's best and worst as a DPO pair against the frozen reference."
        ),
        new_code_cell(
            'odpo = run("tiny_online_dpo.yaml", "online_dpo", SFT,\n'
            "           f\"inputs.reward_checkpoint={WORK / 'reward' / 'checkpoints'}\",\n"
            '           f"grpo.iterations={2 if SMOKE else 30}", f"grpo.eval_examples={4 if SMOKE else 64}")\n'
            "print({k: v for k, v in odpo.items() if k.startswith('greedy_')})"
        ),
        new_markdown_cell(
            "## GRPO with a verifiable reward\n\nGroups of samples per arithmetic prompt, "
            "group-normalised advantages, the exact answer as reward."
        ),
        new_code_cell(
            'grpo = run("tiny_grpo.yaml", "grpo", SFT, f"grpo.iterations={2 if SMOKE else 60}",\n'
            '           f"grpo.eval_examples={4 if SMOKE else 51}", f"grpo.max_new_tokens={8 if SMOKE else 40}",\n'
            '           f"grpo.eval_max_new_tokens={8 if SMOKE else 40}")\n'
            "print({k: v for k, v in grpo.items() if isinstance(v, (int, float))})"
        ),
    ]


def write(name: str, cells: list, out: Path) -> None:
    for i, cell in enumerate(cells):
        cell.id = f"{Path(name).stem}-{i}"  # stable ids: a rerun writes the same bytes
    nb = new_notebook(cells=cells)
    nb.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
        colab={"provenance": []},
        accelerator="TPU",
    )
    nbformat.write(nb, out / name)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(exist_ok=True)
    write("quickstart.ipynb", quickstart(), out)
    write("bring_your_own_model.ipynb", byo_model(), out)
    write("alignment.ipynb", alignment(), out)


if __name__ == "__main__":
    main()
