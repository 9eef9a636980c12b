"""Config sections for models, the device mesh, training, checkpoints and generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from jaxllm.config.checks import above, at_least, sampling


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling for long contexts (`llama3` as in Llama 3.1)."""

    type: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def _validate(self) -> None:
        above(self, 0, "factor", "low_freq_factor", "high_freq_factor")
        at_least(self, 1, "original_max_seq_len")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor: must be > low_freq_factor ({self.low_freq_factor}) for "
                f"llama3 scaling, got {self.high_freq_factor}"
            )


_GPT2 = dict(
    norm="layernorm",
    mlp="gelu",
    positions="learned",
    use_bias=True,
    norm_eps=1e-5,
    tie_embeddings=True,
    vocab_size=50257,
    max_seq_len=1024,
)


_BERT = dict(
    arch="encoder",
    norm="layernorm",
    norm_eps=1e-12,
    norm_position="post",
    mlp="gelu_exact",
    positions="learned",
    use_bias=True,
    tie_embeddings=True,
    max_seq_len=512,
    type_vocab_size=2,
)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer covering the GPT-2 and Llama families.

    `preset:` fills every key from `PRESETS`; keys given next to it override the preset.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256),
        "gpt2_124m": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
        "gpt2_350m": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
        "gpt2_774m": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20, d_ff=5120),
        "gpt2_1558m": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25, d_ff=6400),
        # GPT-3 175B's shape (Brown et al. 2020, table 2.1), with dense attention in every
        # layer (GPT-3 alternated dense and locally banded sparse layers)
        "gpt3_175b": dict(
            _GPT2, d_model=12288, n_layers=96, n_heads=96, d_ff=49152, max_seq_len=2048
        ),  # fmt: skip
        # BERT encoders (arch: encoder): post-LN, exact GELU, token-type embeddings
        "bert_tiny": dict(_BERT, d_model=128, n_layers=2, n_heads=2, d_ff=512),
        "bert_base": dict(_BERT, d_model=768, n_layers=12, n_heads=12, d_ff=3072, vocab_size=30522),
        "llama_1b": dict(  # Llama-3.2-1B's shape
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            d_ff=8192,
            vocab_size=128256,
            max_seq_len=8192,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            positions="rope",
            rope_theta=500000.0,
            use_bias=False,
            tie_embeddings=True,
            rope_scaling=dict(
                type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_seq_len=8192,
            ),
        ),
    }

    preset: str = ""
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: n_heads (multi-head); 1: multi-query; else grouped-query
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 512
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_exact", "swiglu"] = "gelu"  # gelu: tanh approx.; exact: BERT's
    positions: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    use_bias: bool = True  # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2); implied by use_bias
    tie_embeddings: bool = True  # the output layer is the transposed token embedding
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # the output layer's result: float32 (accumulated and written in f32) or bfloat16 (written
    # in bf16 as PyTorch autocast does: half the bytes of the [B, L, V] logits; the losses
    # still reduce them in f32)
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"  # activation checkpointing per block
    # blocks stacked on a leading `layers` axis and run by lax.scan: one compiled block, so
    # compile time does not grow with depth (the checkpoint layout differs from unrolled)
    scan_layers: bool = False
    # causal attention kernel for training/scoring (models/kernels.py): auto picks cudnn on
    # NVIDIA GPUs and splash on TPUs for 16-bit compute, else the xla einsum path
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # encoders (models/encoder.py): bidirectional attention over the real tokens
    arch: Literal["decoder", "encoder"] = "decoder"
    norm_position: Literal["pre", "post"] = "pre"  # post: BERT's LN(x + f(x)) (encoders)
    type_vocab_size: int = 0  # encoders: token-type (segment A/B) embeddings; 0: none
    # cudnn with packed rows: documents per row it keeps apart (more are merged, see
    # models/kernels.py); its workspace grows with batch x this x seq_len
    attention_max_docs: int = 16

    def _validate(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.n_heads < 1 or self.d_ff < 1:
            raise ValueError("d_model: d_model, n_layers, n_heads and d_ff must be >= 1")
        at_least(self, 0, "vocab_size", note=" (0: the tokenizer's vocabulary size)")
        at_least(self, 0, "n_kv_heads", note=" (0: n_heads)")
        at_least(self, 0, "head_dim", note=" (0: d_model // n_heads)")
        at_least(self, 0, "type_vocab_size", note=" (0: no token types)")
        at_least(self, 1, "max_seq_len")
        above(self, 0, "norm_eps", "init_std", "rope_theta")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"n_heads: d_model {self.d_model} is not divisible by {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads: n_heads {self.n_heads} not divisible by {self.kv_heads}")
        if self.positions == "rope" and self.head_size % 2:
            raise ValueError(f"head_dim: RoPE needs an even head size, got {self.head_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.arch == "decoder" and (self.norm_position == "post" or self.type_vocab_size):
            raise ValueError("arch: norm_position post and token types are encoder options")
        if self.arch == "encoder" and self.scan_layers:
            raise ValueError(
                "scan_layers: encoders (arch: encoder) run their blocks unrolled, and imported "
                "BERT checkpoints are laid out per layer; set model.scan_layers: false"
            )
        if self.attention_max_docs < 1:
            raise ValueError(f"attention_max_docs: must be >= 1, got {self.attention_max_docs}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (-1 takes the remaining devices) and the sharding rule table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: Literal["dp", "fsdp", "fsdp_tp"] = "fsdp"

    def _validate(self) -> None:
        for key in ("data", "fsdp", "tensor"):
            v = getattr(self, key)
            if v == 0 or v < -1:
                raise ValueError(f"{key}: must be >= 1 or -1 (the remaining devices), got {v}")
        rest = [k for k in ("data", "fsdp", "tensor") if getattr(self, k) == -1]
        if len(rest) > 1:
            raise ValueError(f"{rest[1]}: at most one axis may be -1, got -1 for {rest}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon on the attention and MLP matrices, AdamW on the rest) with linear
    warmup then cosine, linear, constant or warmup-stable-decay (`wsd`: lr held, then a
    1 - sqrt cooldown over the last `decay_fraction` of the steps), and global-norm clipping."""

    name: Literal["adamw", "muon"] = "adamw"  # muon: on the attention/MLP matrices
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the share of the steps that cools down
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # >= 2-D weights incl. embeddings; not biases or norms
    grad_clip: float = 1.0  # 0 disables

    def _validate(self) -> None:
        bad = {
            "lr": not self.lr > 0,
            "warmup_steps": self.warmup_steps < 0,
            "min_lr_ratio": not 0 <= self.min_lr_ratio <= 1,
            "b1": not 0 <= self.b1 < 1,
            "b2": not 0 <= self.b2 < 1,
            "eps": not self.eps > 0,
            "weight_decay": not self.weight_decay >= 0,
            "grad_clip": not self.grad_clip >= 0,
            "decay_fraction": not 0 < self.decay_fraction <= 1,
        }
        want = {"lr": "> 0", "warmup_steps": ">= 0", "min_lr_ratio": "in [0, 1]",
                "b1": "in [0, 1)", "b2": "in [0, 1)", "eps": "> 0", "weight_decay": ">= 0",
                "grad_clip": ">= 0 (0: off)", "decay_fraction": "in (0, 1]"}  # fmt: skip
        for key, wrong in bad.items():
            if wrong:
                raise ValueError(f"{key}: must be {want[key]}, got {getattr(self, key)}")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the held-out `metric` (a key of the stage's evaluation: loss, accuracy,
    pair_accuracy, ...) has not improved by more than `min_delta` for `patience`
    evaluations (0: never stop); `mode` says which way is better. It also defines "best" for
    `train.keep_best`."""

    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 0
    min_delta: float = 0.0

    def _validate(self) -> None:
        at_least(self, 0, "patience", note=" (0: never stop)")
        at_least(self, 0, "min_delta")


@dataclass(frozen=True)
class TrainConfig:
    """The generic loop: steps, accumulation, logging, eval and checkpoint cadence."""

    steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is per micro-batch)
    optim: OptimConfig = field(default_factory=OptimConfig)
    z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
    # >0: output layer + loss fused over this many positions at a time (must divide seq_len);
    # 0: off; -1 (auto): 32 on CPU, where it measured 1.02-1.11x the plain step, else off
    loss_chunk: int = -1
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0  # 0: the whole validation split
    checkpoint_every: int = 200
    # steps saved besides every checkpoint_every-th (e.g. the branch points of a WSD scaling
    # sweep); they count in keep_checkpoints like the others
    checkpoint_at: tuple[int, ...] = ()
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    # pretrain from inputs.checkpoint (continued pretraining): Adam's moments fresh or the
    # checkpoint's (the step and the schedule start at 0 either way)
    init_optimizer: Literal["fresh", "checkpoint"] = "fresh"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    keep_best: bool = False  # the best evaluation's weights in best/, handed to later stages

    def _validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        at_least(self, 0, "z_loss")
        at_least(self, 1, "log_every")
        at_least(self, 0, "eval_every", "checkpoint_every", note=" (0: at the last step only)")
        at_least(self, 0, "eval_batches", note=" (0: the whole validation split)")
        if self.loss_chunk < -1:
            raise ValueError(f"loss_chunk: must be >= 0 or -1 (auto), got {self.loss_chunk}")
        if self.keep_checkpoints < 1:
            raise ValueError(
                f"keep_checkpoints: must be >= 1 (the newest checkpoints kept), "
                f"got {self.keep_checkpoints}"
            )
        wrong = [s for s in self.checkpoint_at if not 1 <= s <= self.steps]
        if wrong:
            raise ValueError(
                f"checkpoint_at: steps must be in [1, steps = {self.steps}], got {wrong}"
            )


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling with the KV-cache engine: `temperature: 0` is greedy decoding."""

    prompts: tuple[str, ...] = ()
    prompts_file: str = ""  # JSONL with a "prompt" key per line
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: tuple[str, ...] = ("</s>",)
    batch_size: int = 8
    add_bos: bool = True
    # chat: each prompt is a user turn in the chat template (after `system`, if given), the
    # model answers as the assistant and stops at <|end|>: how an SFT model was trained
    chat: bool = False
    system: str = ""

    def _validate(self) -> None:
        if self.system and not self.chat:
            raise ValueError("system: a system prompt needs chat: true")
        sampling(self)
        at_least(self, 1, "max_new_tokens", "batch_size")
