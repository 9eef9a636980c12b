"""Config sections for `stage: ppo` and `stage: grpo` (RL fine-tuning with sampled rollouts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxllm.config.checks import above, at_least, within

_KL = ("k1", "k2", "k3")


def _check_common(c) -> None:
    """Checks shared by both sections (prompt files, rollout and optimisation sizes)."""
    if not c.prompt_file:
        raise ValueError("prompt_file: must not be empty")
    for key in ("iterations", "max_new_tokens", "epochs", "minibatch_size"):
        if getattr(c, key) < 1:
            raise ValueError(f"{key}: must be >= 1, got {getattr(c, key)}")
    at_least(c, 1, "eval_max_new_tokens")
    if not c.temperature > 0:
        raise ValueError(
            f"temperature: training rollouts sample, so it must be > 0, got {c.temperature} "
            "(greedy decoding, 0, is for evaluation only)"
        )
    if not 0 < c.clip_eps < 1:
        raise ValueError(f"clip_eps: must be in (0, 1), got {c.clip_eps}")
    if c.eval_examples < 0:
        raise ValueError(f"eval_examples: must be >= 0, got {c.eval_examples}")
    above(c, 0, "logprob_tol")
    if not (c.tis_cap == 0 or c.tis_cap >= 1):
        raise ValueError(
            f"tis_cap: 0 (off) or a cap >= 1 (below 1 biases every token), got {c.tis_cap}"
        )
    if c.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: must be >= 0, got {c.checkpoint_every}")
    if c.max_staleness < 0:
        raise ValueError(
            f"max_staleness: must be >= 0 (0: synchronous rollouts), got {c.max_staleness}"
        )
    if c.max_staleness and not c.tis_cap:
        raise ValueError(
            f"max_staleness: {c.max_staleness} samples with weights up to {c.max_staleness} "
            "updates old, and the loss corrects for that with truncated importance weights: "
            "set tis_cap (e.g. 2)"
        )


@dataclass(frozen=True)
class PPOConfig:
    """`stage: ppo` — actor from `inputs.checkpoint`, frozen reference (the same checkpoint),
    a value head (critic), per-token KL penalty to the reference, reward at the last token.

    `reward` is a rule name from `jaxllm.trainers.rewards.REWARDS` or `model` (a trained
    reward model at `reward_checkpoint`); `eval_rules` names rules of that registry whose
    rates on the greedy held-out answers are reported beside it. Prompt files are JSONL read
    by `PromptRecords` (`answer`, or an SFT record's `response`, is the reference); `task`
    keeps one task only.
    """

    prompt_file: str = "asset:sft/train.jsonl"
    val_file: str = "asset:sft/val.jsonl"  # held-out prompts for the greedy before/after
    task: str = ""  # keep only records of this task ("" = all)
    iterations: int = 10
    rollout_batch: int = 32  # prompts sampled per iteration (one response each)
    max_new_tokens: int = 16
    temperature: float = 1.0
    epochs: int = 2  # passes over each iteration's rollouts
    minibatch_size: int = 16  # rollouts per optimizer step (divides rollout_batch)
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0  # entropy bonus
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05  # initial / fixed coefficient of the per-token KL penalty
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al. controller towards kl_target
    kl_target: float = 0.1  # per-sequence KL the adaptive controller aims at
    kl_horizon: int = 10000
    kl_coef_min: float = 0.0  # the adaptive coefficient never drops below it
    tis_cap: float = 0.0  # truncated IS weight min(pi_old / pi_sampler, cap) (0: off)
    # k >= 1: rollouts sampled in a background thread with weights up to k updates old while
    # the learner trains (jaxllm/trainers/rl_async.py); needs tis_cap. 0: synchronous.
    max_staleness: int = 0
    critic: Literal["shared", "separate"] = "shared"
    reward: str = "arithmetic"  # a rule name, or "model"
    reward_checkpoint: str = ""  # `reward: model`: a `stage: reward` checkpoint ("": inputs')
    # Rule terms added to `reward` in training (sum of weight * rule): e.g. a reward model
    # plus `chosen_f1`, a reference-guided term. The greedy before/after `reward` figure stays
    # `reward` alone; the rules' rates are there when `eval_rules` names them.
    rule_rewards: tuple[str, ...] = ()
    rule_weights: tuple[float, ...] = ()
    eval_examples: int = 64
    eval_max_new_tokens: int = 16
    eval_rules: tuple[str, ...] = ()  # rule rates of the greedy answers and the rollouts
    logprob_tol: float = 1e-4  # mean |sampler - learner| log-prob before the run stops
    checkpoint_every: int = 5  # iterations between resume checkpoints (0: after the last only)

    def _validate(self) -> None:
        _check_common(self)
        at_least(self, 1, "rollout_batch")
        # 0 would pin the value head to the rollout's estimates (no learning), not switch
        # clipping off
        above(self, 0, "value_clip")
        at_least(self, 0, "vf_coef", "ent_coef")
        if len(self.rule_rewards) != len(self.rule_weights):
            raise ValueError(
                f"rule_rewards, rule_weights: need one weight per rule, got "
                f"{len(self.rule_rewards)} rules and {len(self.rule_weights)} weights"
            )
        if self.rollout_batch % self.minibatch_size:
            raise ValueError(
                f"minibatch_size: {self.minibatch_size} does not divide rollout_batch "
                f"{self.rollout_batch}"
            )
        within(self, 0.0, 1.0, "gamma", "lam")
        at_least(self, 0, "kl_coef")
        above(self, 0, "kl_target")
        at_least(self, 1, "kl_horizon")
        if not 0 <= self.kl_coef_min <= self.kl_coef:
            raise ValueError(
                f"kl_coef_min: must be in [0, kl_coef = {self.kl_coef}], got {self.kl_coef_min}"
            )


@dataclass(frozen=True)
class GRPOConfig:
    """`stage: grpo` — `group_size` sampled completions per prompt scored by weighted rewards
    (`rewards`, `reward_weights`: rules, and `model` for a reward model), group-relative
    advantages (or online DPO's pairs), the clipped objective and an optional KL term to the
    frozen reference (`beta`). `eval_rules` as PPO's."""

    prompt_file: str = "asset:sft/train.jsonl"
    val_file: str = "asset:sft/val.jsonl"
    task: str = ""
    iterations: int = 10
    prompts_per_iteration: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    epochs: int = 1
    minibatch_size: int = 32  # completions per optimizer step (divides prompts x group_size)
    clip_eps: float = 0.2
    beta: float = 0.0  # KL(pi || ref) weight; 0: no reference pass in the loss
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # k1 is rejected: see _validate
    scale_by_std: bool = True  # false: r - mean (with advantage: grpo, the same as drgrpo)
    # The registries (jaxllm/trainers/advantages.py ADVANTAGES and PAIR_ADVANTAGES,
    # jaxllm/training/policy_losses.py POLICY_LOSSES); the defaults are GRPO as it was before
    # them, bit for bit.
    advantage: Literal[
        "grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "online_dpo"
    ] = "grpo"  # fmt: skip
    dpo_beta: float = 0.1  # online_dpo: DPO's beta for each group's best/worst pair
    loss: Literal["ppo_clip", "dapo", "gspo", "cispo"] = "ppo_clip"
    clip_eps_high: float = 0.0  # upper ratio width, every loss (0: clip_eps, symmetric)
    # tokens: / token count; constant: / rows x max_new_tokens (Dr. GRPO). gspo averages over
    # responses instead and takes `tokens` only
    loss_norm: Literal["tokens", "constant"] = "tokens"
    dynamic_sampling: bool = False  # DAPO: drop the groups whose rewards are all equal
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens (0: off)
    overlong_penalty: float = 1.0  # the punishment at max_new_tokens
    tis_cap: float = 0.0  # truncated IS weight min(pi_old / pi_sampler, cap) (0: off)
    # k >= 1: rollouts sampled in a background thread with weights up to k updates old while
    # the learner trains (jaxllm/trainers/rl_async.py); needs tis_cap. 0: synchronous.
    max_staleness: int = 0
    # rule names (jaxllm/trainers/rewards.py REWARDS) and `model`: the reward model at
    # `reward_checkpoint` ("": inputs.reward_checkpoint), scored on the rollout rows
    rewards: tuple[str, ...] = ("arithmetic",)
    reward_weights: tuple[float, ...] = (1.0,)
    reward_checkpoint: str = ""
    # Multi-turn episodes (jaxllm/trainers/episodes.py): an environment from
    # jaxllm/trainers/envs.py ENVS ("": single-turn rollouts); max_new_tokens is then per turn.
    env: str = ""
    max_turns: int = 4  # model turns per episode (tool calls + the final answer)
    eval_examples: int = 64
    eval_max_new_tokens: int = 16
    eval_rules: tuple[str, ...] = ()  # rule rates of the greedy answers and the rollouts
    logprob_tol: float = 1e-4  # mean |sampler - learner| log-prob before the run stops
    checkpoint_every: int = 5  # iterations between resume checkpoints (0: after the last only)

    def _validate(self) -> None:
        _check_common(self)
        if self.max_turns < 1:
            raise ValueError(f"max_turns: must be >= 1, got {self.max_turns}")
        if self.env and self.overlong_buffer:
            raise ValueError(
                "overlong_buffer: measures a response against max_new_tokens, which is per turn "
                "with env (an episode has several turns); set overlong_buffer: 0"
            )
        if self.group_size < 2 or self.prompts_per_iteration < 1:
            raise ValueError("group_size: must be >= 2 (and prompts_per_iteration >= 1)")
        n = self.prompts_per_iteration * self.group_size
        if n % self.minibatch_size:
            raise ValueError(f"minibatch_size: {self.minibatch_size} does not divide {n}")
        if not self.rewards or len(self.rewards) != len(self.reward_weights):
            raise ValueError("rewards, reward_weights: need one weight per reward name")
        if self.rewards.count("model") > 1:
            raise ValueError("rewards: name `model` (the reward model) once, with one weight")
        if self.reward_checkpoint and "model" not in self.rewards:
            raise ValueError(f"reward_checkpoint: {self.reward_checkpoint} is read for a "
                             "`model` reward; add model to grpo.rewards or leave it empty")  # fmt: skip
        at_least(self, 0, "beta")
        if self.loss == "gspo" and self.loss_norm == "constant":
            raise ValueError(
                "loss_norm: 'constant' divides token sums (Dr. GRPO); loss 'gspo' is a mean over "
                "responses, each counted once (GSPO eq. 5): use loss_norm: tokens"
            )
        at_least(self, 0, "clip_eps_high", "overlong_penalty")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer: must be in [0, max_new_tokens={self.max_new_tokens}], got "
                f"{self.overlong_buffer}"
            )
        if not self.dpo_beta > 0:
            raise ValueError(f"dpo_beta: must be > 0, got {self.dpo_beta}")
        if self.advantage != "online_dpo" and self.dpo_beta != 0.1:
            raise ValueError(f"dpo_beta: {self.dpo_beta} is online DPO's beta; advantage "
                             f"'{self.advantage}' does not use it: set it 0.1 or use online_dpo")  # fmt: skip
        if self.advantage == "online_dpo" and self.loss != "ppo_clip":
            raise ValueError(
                f"loss: online_dpo's advantages give DPO's gradient through the plain policy "
                f"gradient, loss ppo_clip at ratio 1; got {self.loss!r}"
            )
        if self.kl_estimator == "k1":
            raise ValueError(
                "kl_estimator: k1 is not allowed in GRPO: the KL is a loss term there and the "
                "gradient of k1 (log pi - log ref) is zero in expectation, so beta would have "
                "no effect; use k3 or k2"
            )
