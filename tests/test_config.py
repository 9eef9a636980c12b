"""Config loading: strict keys with hints, types, ranges, overrides, pipeline inlining."""

import pytest
import yaml

from jaxllm.config import from_dict, load_config, replace, to_dict
from jaxllm.errors import ConfigError


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(obj))
    return p


def test_unknown_key_names_path_and_closest(tmp_path):
    p = write(tmp_path, "x.yaml", {"stage": "data", "data": {"filters": {"min_char": 5}}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'data.filters.min_char'" in msg
    assert "did you mean 'data.filters.min_chars'" in msg
    assert "\n" not in msg


def test_unknown_top_level_key_without_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'zzz'.*valid keys here: stage"):
        from_dict({"stage": "data", "zzz": 1})


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (
            {"data": {"filters": {"min_chars": "ten"}}},
            "'data.filters.min_chars': expected int, got 'ten' (str)",
        ),
        ({"data": {"val_fraction": True}}, "'data.val_fraction': expected float, got True (bool)"),
        (
            {"data": {"on_error": "ignore"}},
            "'data.on_error': expected one of 'skip', 'fail', got 'ignore'",
        ),
        ({"data": {"sources": {"path": "a"}}}, "'data.sources': expected a list of a mapping"),
        ({"data": {"sources": [{"weight": 2}]}}, "'data.sources.0.path' is required"),
        ({"tokenizer": {"vocab_size": 3}}, "'tokenizer.vocab_size': must be >= 267"),
        ({"data": {"dedup": {"threshold": 1.5}}}, "'data.dedup.threshold': must be in (0, 1]"),
        ({"train": {"optim": {"lr": -1}}}, "'train.optim.lr': must be > 0, got -1"),
        ({"train": {"optim": {"warmup_steps": -5}}}, "'train.optim.warmup_steps': must be >= 0"),
        (
            {"train": {"optim": {"min_lr_ratio": 2}}},
            "'train.optim.min_lr_ratio': must be in [0, 1]",
        ),
        ({"train": {"optim": {"b2": 1.5}}}, "'train.optim.b2': must be in [0, 1), got 1.5"),
        ({"train": {"grad_accum": 0}}, "'train.grad_accum': must be >= 1, got 0"),
        ({"train": {"keep_checkpoints": 0}}, "'train.keep_checkpoints': must be >= 1"),
        ({"train": {"keep_checkpoints": -1}}, "'train.keep_checkpoints': must be >= 1"),
        (
            {"train": {"steps": 10, "checkpoint_at": [5, 11, 0]}},
            "'train.checkpoint_at': steps must be in [1, steps = 10], got [11, 0]",
        ),
        (
            {"scaling": {"schedule": "wsd", "warmup": 0.3, "decay_fraction": 0.7}},
            "'scaling.decay_fraction': with schedule wsd, warmup + decay_fraction must be < 1",
        ),
    ],
)
def test_wrong_values_name_key_type_and_value(raw, expect):
    with pytest.raises(ConfigError) as e:
        from_dict({"stage": "data", **raw})
    assert expect in str(e.value)


@pytest.mark.parametrize(
    ("stage", "section", "expect"),
    [
        (
            "grpo",
            {"kl_estimator": "k1"},
            "config key 'grpo.kl_estimator': k1 is not allowed in GRPO: the KL is a loss term "
            "there and the gradient of k1 (log pi - log ref) is zero in expectation",
        ),
        ("grpo", {"temperature": 0}, "config key 'grpo.temperature': training rollouts sample"),
        ("ppo", {"temperature": 0.0}, "config key 'ppo.temperature': training rollouts sample"),
        ("ppo", {"temperature": -1.0}, "must be > 0, got -1.0"),
        (
            "ppo",
            {"kl_coef": 0.2, "kl_coef_min": 0.3},
            "config key 'ppo.kl_coef_min': must be in [0, kl_coef = 0.2], got 0.3",
        ),
    ],
)
def test_rl_sections_reject_k1_in_grpo_and_greedy_rollouts(stage, section, expect):
    with pytest.raises(ConfigError) as e:
        from_dict({"stage": stage, stage: section})
    msg = str(e.value)
    assert expect in msg and "\n" not in msg
    if "kl_estimator" in section:
        assert "use k3 or k2" in msg


def test_rl_kl_estimators_accepted():
    for kind in ("k2", "k3"):
        cfg = from_dict({"stage": "grpo", "grpo": {"kl_estimator": kind}})
        assert cfg.grpo.kl_estimator == kind
    # PPO puts the KL into the reward (not differentiated): k1 stays valid there
    assert from_dict({"stage": "ppo", "ppo": {"kl_estimator": "k1"}}).ppo.kl_estimator == "k1"
    assert from_dict({"stage": "grpo", "grpo": {"temperature": 0.5}}).grpo.temperature == 0.5


def test_int_accepted_for_float_and_frozen():
    cfg = from_dict({"stage": "data", "data": {"val_fraction": 0}})
    assert cfg.data.val_fraction == 0.0 and isinstance(cfg.data.val_fraction, float)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # frozen


def test_round_trip_through_plain_data():
    cfg = from_dict({"stage": "data", "data": {"sources": [{"path": "a", "weight": 2}]}})
    assert from_dict(to_dict(cfg)) == cfg
    assert replace(cfg, **{"data.val_fraction": 0.5}).data.val_fraction == 0.5


def test_overrides_parse_yaml_values_and_list_items(tmp_path):
    p = write(tmp_path, "run.yaml", {"stage": "data", "data": {"sources": [{"path": "a"}]}})
    cfg = load_config(
        p, ["seed=7", "data.sources.0.weight=0.5", "data.filters.scripts=[latin, han]"]
    )
    assert cfg.name == "run" and cfg.seed == 7
    assert cfg.data.sources[0].weight == 0.5
    assert cfg.data.filters.scripts == ("latin", "han")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["seed"])
    with pytest.raises(ConfigError, match="no list item 3"):
        load_config(p, ["data.sources.3.weight=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: data\n  x: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_pipeline_inlines_entries_inherits_seed_and_nests_run_dirs(tmp_path):
    write(tmp_path, "d.yaml", {"stage": "data", "data": {"val_fraction": 0.1}})
    p = write(
        tmp_path,
        "pipe.yaml",
        {
            "stage": "pipeline",
            "seed": 3,
            "output_dir": str(tmp_path / "out"),
            "pipeline": ["d.yaml", {"config": "d.yaml", "data.val_fraction": 0.2, "seed": 9}],
        },
    )
    cfg = load_config(p, ["pipeline.0.data.shard_docs=10"])
    a, b = cfg.pipeline
    assert (a.seed, b.seed) == (3, 9)
    assert (a.data.val_fraction, b.data.val_fraction) == (0.1, 0.2)
    assert a.data.shard_docs == 10 and b.data.shard_docs != 10
    assert a.run_dir == tmp_path / "out" / "1-d" and b.run_dir == tmp_path / "out" / "2-d"
    # the resolved pipeline is self-contained
    assert from_dict(to_dict(cfg)) == cfg


def test_pipeline_entry_errors_name_the_entry(tmp_path):
    write(tmp_path, "d.yaml", {"stage": "data", "data": {"bogus": 1}})
    p = write(tmp_path, "pipe.yaml", {"stage": "pipeline", "pipeline": ["d.yaml"]})
    with pytest.raises(ConfigError, match="'pipeline.0.data.bogus'"):
        load_config(p)
    p = write(tmp_path, "pipe2.yaml", {"stage": "pipeline", "pipeline": ["missing.yaml"]})
    with pytest.raises(ConfigError, match="pipeline entry 1: config file 'missing.yaml' not found"):
        load_config(p)


def test_yaml_exponent_floats_without_dot_are_floats(tmp_path):
    p = write(tmp_path, "x.yaml", {"stage": "data"})
    p.write_text("stage: pretrain\ntrain:\n  optim:\n    lr: 3e-4\n")
    assert load_config(p).train.optim.lr == 3e-4
    assert load_config(p, ["train.optim.lr=1e30"]).train.optim.lr == 1e30
    with pytest.raises(ConfigError, match="expected float, got 'fast'"):
        load_config(p, ["train.optim.lr=fast"])


def test_loss_chunk_auto_per_backend_and_explicit_must_divide():
    from jaxllm.config import from_dict
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.lm import resolve_loss_chunk

    def cfg(chunk, seq=128):
        return from_dict({"stage": "pretrain", "train": {"loss_chunk": chunk},
                          "loader": {"seq_len": seq}})  # fmt: skip

    assert from_dict({"stage": "pretrain"}).train.loss_chunk == -1  # auto by default
    assert resolve_loss_chunk(cfg(-1), "cpu") == 32
    assert resolve_loss_chunk(cfg(-1, seq=100), "cpu") == 0  # 32 does not divide 100
    assert resolve_loss_chunk(cfg(-1), "gpu") == 0
    assert resolve_loss_chunk(cfg(0), "cpu") == 0
    assert resolve_loss_chunk(cfg(64), "gpu") == 64
    with pytest.raises(
        ConfigError, match="'train.loss_chunk': 48 does not divide loader.seq_len 128"
    ):
        resolve_loss_chunk(cfg(48), "cpu")
    with pytest.raises(ConfigError, match="loss_chunk"):
        cfg(-2)


def _raw(key, value):
    from jaxllm.config import set_dotted

    raw = {"stage": "data"}
    set_dotted(raw, key, value)
    return raw


# (dotted key, a value out of range, the bound itself or a value at it, which loads)
RANGES = [
    ("generate.batch_size", -1, 1),
    ("generate.batch_size", 0, 1),
    ("train.eval_batches", -1, 0),  # 0: the whole validation split
    ("train.eval_every", -1, 0),  # 0: at the last step only
    ("train.checkpoint_every", -1, 0),
    ("train.log_every", 0, 1),
    ("train.z_loss", -0.1, 0),
    ("train.early_stopping.min_delta", -1, 0),
    ("ppo.rollout_batch", 0, 16),
    ("ppo.rollout_batch", -16, 16),  # divisible by minibatch_size 16: passed before
    ("ppo.eval_max_new_tokens", 0, 1),
    ("grpo.eval_max_new_tokens", 0, 1),
    ("ppo.vf_coef", -1, 0),
    ("ppo.ent_coef", -1, 0),
    ("ppo.value_clip", 0, 0.01),
    ("ppo.value_clip", -1, 0.01),
    ("seed", -1, 0),
    ("seed", 2**63, 2**63 - 1),
    ("model.n_kv_heads", -1, 0),
    ("model.head_dim", -1, 0),
    ("model.vocab_size", -1, 0),
    ("model.type_vocab_size", -1, 0),
    ("model.max_seq_len", 0, 1),
    ("model.norm_eps", 0, 1e-12),
    ("model.init_std", -1, 1e-6),
    ("model.rope_theta", 0, 1.5),
    ("model.rope_scaling.factor", 0, 0.5),
    ("model.rope_scaling.original_max_seq_len", 0, 1),
    ("mesh.data", 0, -1),
    ("mesh.tensor", -2, 1),
    ("tokenizer.num_threads", 0, 1),
    ("tokenizer.num_threads", 1025, 1024),
    ("tokenizer.max_sentence_length", 0, 4),
    ("tokenizer.max_sentence_length", 3, 4),  # a UTF-8 character is up to 4 bytes
    ("tokenizer.max_train_chars", 0, 1),
    ("loader.num_threads", -1, 0),
    ("loader.prefetch", -1, 0),
    ("eval.samples", -2, -1),  # -1: all
    ("scaling.bootstrap", 0, 1),
    ("scaling.eval_batches", -1, 0),
    ("scaling.aspect", 0, 1),
    ("scaling.holdout_tokens", 0, 1),
    ("scaling.tokens", [1000, 0], [1000, 1]),
    ("scaling.decay_fraction", 0, 1),
    ("scaling.lr", 0, 1e-9),
    ("mlm.generator_layers", 0, 1),
    ("mlm.disc_weight", 0, 0.5),
]


@pytest.mark.parametrize(("key", "bad", "good"), RANGES)
def test_out_of_range_counts_and_sizes_fail_at_load_naming_the_key(key, bad, good):
    with pytest.raises(ConfigError) as e:
        from_dict(_raw(key, bad))
    msg = str(e.value)
    assert msg.startswith(f"config key '{key}': ") and "\n" not in msg
    assert f"got {bad}" in msg or f"got {list(bad)}" in msg or f"got {float(bad)}" in msg
    node = from_dict(_raw(key, good))  # the bound itself loads
    for part in key.split("."):
        node = getattr(node, part)
    assert node == (tuple(good) if isinstance(good, list) else good)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": {"rope_scaling": {"type": "llama3", "high_freq_factor": 1.0}}},
         "model.rope_scaling.high_freq_factor"),  # (hi - lo) divides: 0 gives NaN frequencies
        ({"mesh": {"data": -1, "fsdp": -1}}, "mesh.fsdp"),  # one axis takes the rest
        ({"eval": {"models": [{"name": "a", "checkpoint": ""}]}}, "eval.models.0.checkpoint"),
        ({"eval": {"models": [{"name": "", "checkpoint": "c"}]}}, "eval.models.0.name"),
        ({"ppo": {"kl_horizon": 0}}, "ppo.kl_horizon"),
        ({"scaling": {"tokens": []}}, "scaling.tokens"),
        # these were one message per group, named after its first key
        ({"generate": {"top_k": -1}}, "generate.top_k"),
        ({"generate": {"top_p": 0.0}}, "generate.top_p"),
        ({"chat": {"top_p": 1.5}}, "chat.top_p"),
        ({"chat": {"stream": 0}}, "chat.stream"),
        ({"chat": {"max_turns": -1}}, "chat.max_turns"),
        ({"eval": {"limit": -1}}, "eval.limit"),
        ({"eval": {"max_len": -1}}, "eval.max_len"),
        ({"serve": {"max_queue": 0}}, "serve.max_queue"),
        ({"serve": {"min_bucket": 0}}, "serve.min_bucket"),
        ({"score": {"max_len": 1}}, "score.max_len"),
        ({"embed": {"max_len": 1}}, "embed.max_len"),
        ({"ppo": {"lam": 1.5}}, "ppo.lam"),
    ],
)  # fmt: skip
def test_combined_checks_name_the_key_that_is_wrong(raw, key):
    with pytest.raises(ConfigError) as e:
        from_dict({"stage": "data", **raw})
    assert str(e.value).startswith(f"config key '{key}': ")


def test_set_into_a_list_the_file_does_not_give_says_to_set_the_list(tmp_path):
    p = write(tmp_path, "x.yaml", {"stage": "grpo", "grpo": {"rewards": ["arithmetic"]}})
    with pytest.raises(ConfigError) as e:
        load_config(p, ["grpo.reward_weights.0=2"])
    assert str(e.value) == (
        "--set grpo.reward_weights.0: the config gives no list at grpo.reward_weights to "
        "index; set the whole list, e.g. --set 'grpo.reward_weights=[...]'"
    )
    assert load_config(p, ["grpo.reward_weights=[2]"]).grpo.reward_weights == (2.0,)


FLOAT_KEYS = [
    "train.optim.lr", "train.optim.eps", "train.optim.grad_clip", "train.z_loss", "dpo.beta",
    "peft.alpha", "generate.temperature", "chat.temperature", "distill.temperature",
    "ppo.kl_target", "ppo.logprob_tol", "ppo.tis_cap", "grpo.beta", "grpo.clip_eps_high",
    "grpo.reward_weights.0", "model.norm_eps", "model.rope_scaling.factor", "reward.margin",
]  # fmt: skip


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_floats_fail_at_load_naming_the_key(tmp_path, key, text):
    p = write(tmp_path, "x.yaml", {"stage": "grpo", "grpo": {"reward_weights": [1.0]}})
    with pytest.raises(ConfigError) as e:
        load_config(p, [f"{key}={text}"])
    assert str(e.value).startswith(f"config key '{key}': expected a finite number, got ")


def _nan_cases():
    import jaxllm.config as c

    return [
        (c.OptimConfig, ("lr", "eps", "weight_decay", "grad_clip")),
        (c.TrainConfig, ("z_loss",)), (c.EarlyStoppingConfig, ("min_delta",)),
        (c.DPOConfig, ("beta",)), (c.RewardConfig, ("margin",)), (c.PeftConfig, ("alpha",)),
        (c.DistillConfig, ("temperature", "sample_temperature")),
        (c.GenerateConfig, ("temperature",)), (c.ChatConfig, ("temperature",)),
        (c.PPOConfig, ("kl_target", "kl_coef", "logprob_tol", "tis_cap", "value_clip", "vf_coef")),
        (c.GRPOConfig, ("beta", "clip_eps_high", "overlong_penalty", "tis_cap")),
        (c.ModelConfig, ("norm_eps", "init_std", "rope_theta")), (c.MLMConfig, ("disc_weight",)),
        (c.RopeScalingConfig, ("factor", "low_freq_factor")), (c.ScalingConfig, ("lr",)),
    ]  # fmt: skip


def test_range_checks_themselves_fail_nan():
    """Conversion refuses NaN first; each `_validate` must refuse it too (`not x > 0`, not
    `x <= 0`, which NaN passes), e.g. for a section built in code."""
    for cls, keys in _nan_cases():
        for key in keys:
            with pytest.raises(ValueError, match=f"^{key}: "):
                cls(**{key: float("nan")})._validate()


@pytest.mark.parametrize(
    ("text", "line", "key", "first"),
    [
        ("stage: sft\ntrain:\n  steps: 3\n  steps: 5\n", 4, "steps", 3),
        ("stage: sft\nloader: {seq_len: 64}\nmesh: {rules: dp}\nloader: {shuffle: false}\n",
         4, "loader", 2),  # the second block would have thrown the first away
        ("stage: sft\ngenerate: {max_new_tokens: 4, max_new_tokens: 8}\n", 2, "max_new_tokens", 2),
    ],
)  # fmt: skip
def test_duplicate_yaml_keys_name_file_line_and_key(tmp_path, text, line, key, first):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}:{line}: key '{key}' given twice in one mapping (first at line {first}); keep one"
    )


def test_yaml_merge_keys_still_override_and_tags_stay_refused(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("stage: sft\nloader:\n  <<: {seq_len: 64, batch_size: 4}\n  batch_size: 8\n")
    assert (load_config(p).loader.seq_len, load_config(p).loader.batch_size) == (64, 8)
    p.write_text("stage: sft\nname: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match=r"m.yaml:2: invalid YAML"):
        load_config(p)


def test_config_file_not_utf8_is_one_line_naming_the_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("stage: sft\nname: caf\u00e9\n".encode("latin-1"))
    offset = len(b"stage: sft\nname: caf")  # where the lone Latin-1 byte 0xe9 sits
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: not UTF-8 text (byte {offset})"


def test_tokenizer_path_that_would_do_nothing_is_refused(tmp_path):
    """`tokenizer.path` is kept so older run configs (all keys dumped) still load, empty;
    a value would have looked like it chose the tokenizer, and done nothing."""
    old = from_dict({"stage": "tokenizer", "tokenizer": {"path": "my.model"}})  # metadata
    assert old.tokenizer.path == "my.model"
    with pytest.raises(ConfigError, match=r"'tokenizer.path': has no effect; .*inputs.tokenizer"):
        load_config(write(tmp_path, "t.yaml", {"stage": "tokenizer"}), ["tokenizer.path=my.model"])
