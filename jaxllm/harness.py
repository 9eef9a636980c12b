"""lm-evaluation-harness's command line with jaxllm's model registered (`--model jaxllm`):
the same arguments as `lm_eval` (install with `pip install jaxllm[lm_eval]`).

    python -m jaxllm.harness run --model jaxllm \\
        --model_args checkpoint=runs/tiny/5-tiny_sft/checkpoints --tasks T --include_path DIR
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import jaxllm.trainers.lm_eval_bridge  # noqa: F401  (registers the `jaxllm` model)

    cli_evaluate()


if __name__ == "__main__":
    main()
