"""CLI: `python -m jaxllm.main --config configs/x.yaml [--set a.b=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from jaxllm.config import load_config
from jaxllm.errors import JaxllmError
from jaxllm.training.preemption import Preempted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.main", description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML file from configs/")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set loader.seq_len=128 (repeatable)",
    )
    plan = parser.add_argument_group("--plan: memory and FLOPs per device, before a launch")
    plan.add_argument("--plan", action="store_true", help="report; train nothing")
    plan.add_argument("--devices", type=int, default=0,
                      help="plan for N devices, simulated on CPU when this host has another count")  # fmt: skip
    plan.add_argument("--hardware", default="h100",
                      help="the target: h100, h100_pcie, h100_nvl, h200, a100 (80 GB), l4, l40s, "
                      "v4, v5e, v5p, v6e (default h100)")  # fmt: skip
    plan.add_argument("--mfu", type=float, default=0.4,
                      help="the model-FLOPs utilisation the step-time estimate assumes: a fraction "
                      "in (0, 1], e.g. 0.4 for 40%% (the default)")  # fmt: skip
    plan.add_argument("--no-compile", action="store_true",
                      help="skip the AOT compile: count the state only (weights, gradients, "
                      "optimizer), no activations, so no verdict unless that alone does not fit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.plan and args.devices and os.environ.get("_JAXLLM_PLAN_DEVICES") != str(args.devices):
        return _plan_on_simulated_devices(args.devices, argv)
    if args.plan:
        return _plan(args)
    try:
        from jaxllm.trainers import check_stage, run_stage

        cfg = load_config(args.config, args.set)
        check_stage(cfg.stage)
        import jax

        from jaxllm.sharding.multihost import initialize

        if cfg.compile_cache:
            jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compile_cache))
        # `distributed: true` or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID:
        # join the other processes before anything touches a device
        initialize(cfg.distributed)
        summary = run_stage(cfg)
    except JaxllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return Preempted.exit_code
    except KeyboardInterrupt:
        print("interrupted: the run can be resumed with the same command", file=sys.stderr)
        return 130
    from jaxllm.trainers.rl_eval import comparison_lines

    print("\n".join(comparison_lines(summary) + [f"done: {cfg.run_dir}/summary.json"]))
    print(json.dumps(_headline(summary), ensure_ascii=False))
    return 0


def _plan_on_simulated_devices(n: int, argv: list[str] | None) -> int:
    """Re-runs this command in a process with `n` simulated CPU devices (jax fixes its device
    count at start-up), unless this host already has exactly `n`."""
    import jax

    if jax.device_count() == n:
        os.environ["_JAXLLM_PLAN_DEVICES"] = str(n)
        return main(argv)
    env = dict(os.environ, _JAXLLM_PLAN_DEVICES=str(n), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    args = sys.argv[1:] if argv is None else argv
    return subprocess.call([sys.executable, "-m", "jaxllm.main", *args], env=env)


def _plan(args) -> int:
    try:
        from jaxllm.trainers.plan import make_plan, report

        cfg = load_config(args.config, args.set)
        if cfg.stage != "pretrain":
            raise JaxllmError(
                f"--plan: plans stage: pretrain configs, this is '{cfg.stage}' (a stage that "
                "starts from a checkpoint trains that checkpoint's model: plan its pretrain config)"
            )
        p = make_plan(cfg, args.hardware, args.mfu, compile_step=not args.no_compile)
    except JaxllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(p, cfg)))
    print(json.dumps(p))
    return 0


def _headline(summary: dict) -> dict:
    """The top-level scalar figures of a summary, for the terminal."""
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str)}


if __name__ == "__main__":
    sys.exit(main())
