"""`python -m jaxllm.main ARGS...` with a test environment registered as `grpo.env:
every_word` (a stop string a random tiny model writes often, so its episodes take several
turns), for the multi-process episode test (test_multiprocess_episodes.py).

    python -m tests.rl.env_worker ARGS...
"""

import sys


class EveryWordEnv:
    """Ends a model turn at each space and answers with a fixed observation (reward 1)."""

    stop = " "

    def __init__(self):
        self.steps = 0

    def reset(self, record):
        return "<result>"

    def step(self, text):
        self.steps += 1
        return "<result>7</result>", 1.0, False


def main() -> int:
    from jaxllm.main import main as run
    from jaxllm.trainers.envs import ENVS

    ENVS["every_word"] = EveryWordEnv
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
