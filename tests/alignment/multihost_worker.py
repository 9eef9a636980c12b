"""One of two CPU processes joined by `jax.distributed` (run by test_multihost.py): a
`PairPass` over a preference file and the KTO evaluator's pass over its examples, their
gathered rows written as JSON.

    python -m tests.alignment.multihost_worker PROCESS_ID PORT TOKENIZER DATA OUT
"""

import json
import sys
from pathlib import Path

import jax


def main() -> None:
    pid, port, tok_path, data, out = sys.argv[1:6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
    from jaxllm.config import LoaderConfig, MeshConfig
    from jaxllm.sharding import make_mesh
    from jaxllm.tokenizer import Tokenizer
    from jaxllm.tokenizer.chat import ChatTemplate
    from jaxllm.trainers.reward import PairPass

    template = ChatTemplate(Tokenizer.load(tok_path))
    loader = LoaderConfig(seq_len=64, batch_size=4)  # 2 rows a process
    pp = PairPass([Path(data)], template, loader, make_mesh(MeshConfig()))
    rows = pp.collect(jax.jit(lambda b: {"tokens": b["loss_mask"].sum(axis=(1, 2))}))
    info = {"processes": jax.process_count(), "devices": len(jax.devices())}
    examples = example_pass(Path(data), template, loader, make_mesh(MeshConfig()))
    ex = examples.collect(jax.jit(lambda b: {"tokens": b["loss_mask"].sum(axis=1)}))
    info["examples"] = {k: v.tolist() for k, v in ex.items()}
    Path(out).write_text(json.dumps({**info, **{k: v.tolist() for k, v in rows.items()}}))


def example_pass(data, template, loader, mesh):
    """The KTO evaluator's pass: every example of `data` (a pair gives two)."""
    from jaxllm.data.feedback import make_feedback_eval_dataset, open_examples
    from jaxllm.trainers.pairs import HeldOutPass

    records = open_examples([data], template, loader.seq_len)[0]
    return HeldOutPass(records, loader, mesh, lambda pc, n: make_feedback_eval_dataset(
        records, template, loader, process_index=jax.process_index(), process_count=pc,
        num_batches=n), "example")  # fmt: skip


if __name__ == "__main__":
    main()
