"""CLI: `python -m jaxllm.main --config configs/x.yaml [--set a.b=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxllm.config import load_config
from jaxllm.errors import JaxllmError


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
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("interrupted: the run can be resumed with the same command", file=sys.stderr)
        return 130
    print(f"done: {cfg.run_dir}/summary.json")
    print(json.dumps(_headline(summary), ensure_ascii=False))
    return 0


def _headline(summary: dict) -> dict:
    """The top-level scalar figures of a summary, for the terminal."""
    return {k: v for k, v in summary.items() if isinstance(v, int | float | str)}


if __name__ == "__main__":
    sys.exit(main())
