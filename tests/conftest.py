"""Test setup: 8 simulated CPU devices for multi-device code (set before jax is imported)."""

import os
import shutil
import tempfile

# LLVM's -O0 for the compiled programs unless the caller chose a level: the suite's programs
# are tiny and compiled once or twice each, so compiling is most of its time, and -O0 cuts the
# suite's wall time by about a sixth (594 -> 499 s on one VM). It rounds differently (no fused
# multiply-adds), never differently in meaning: every check compares against a tolerance or
# against a second program compiled the same way. `make demo`, the benches and users' runs
# keep XLA's default level.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test run, made here in the controller before
# pytest-xdist starts its workers, so the workers and the subprocesses the tests start (which
# copy os.environ) share it: the same small programs recur across tests and processes (a
# resume test compiles the same train step three times), and a hit costs a file read instead
# of a compile. A fresh directory each run, removed at the end: no state carries between runs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-test-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the controller
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """A small sentencepiece tokenizer with the chat tokens, trained on the shipped SFT set."""
    from jaxllm.config import TokenizerConfig
    from jaxllm.tokenizer import Tokenizer, train_tokenizer
    from tests.sft.conftest import sft_texts

    cfg = TokenizerConfig(vocab_size=1300, character_coverage=0.98)
    path = train_tokenizer(sft_texts(), cfg, tmp_path_factory.mktemp("tok") / "tokenizer")
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def template(tok):
    from jaxllm.tokenizer.chat import ChatTemplate

    return ChatTemplate(tok)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tok):
    """A d_model 32, one-layer decoder pretrained a few steps with `tok` (its data dir is
    `tiny_ckpt.parent.parent / "data"`): the start of every post-training stage test."""
    from tests.sft.test_sft_stage import pretrain

    return pretrain(tmp_path_factory.mktemp("tiny"), tok.path)


@pytest.fixture
def prefills(monkeypatch) -> list:
    """(prompt tokens, weights) of every sampler prefill while the test runs: where the
    sampler put its rows and the model."""
    from jaxllm.generation import sampler as sampler_mod

    calls, real = [], sampler_mod._prefill

    def spy(graphdef, state, prompt, *args, **kw):
        calls.append((prompt[0], state))
        return real(graphdef, state, prompt, *args, **kw)

    monkeypatch.setattr(sampler_mod, "_prefill", spy)
    return calls


def split_over_devices(tokens_BL, weights=()) -> None:
    """Rows split over all devices (one block each); the weights on all of them too."""
    import jax

    n = len(jax.devices())
    assert isinstance(tokens_BL, jax.Array), "host rows: the batch was never split"
    assert len(tokens_BL.sharding.device_set) == n
    assert {s.data.shape[0] for s in tokens_BL.addressable_shards} == {tokens_BL.shape[0] // n}
    assert all(len(x.sharding.device_set) == n for x in jax.tree.leaves(weights))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://bucket/...` served from `tmp_path/bucket` through etils.epath's backend (the
    way a TPU pod's run writes to a bucket), run from `tmp_path` so a path mangled by
    pathlib (`gs:/bucket/...`) would show up as a local `gs:` directory."""
    import os

    from etils.epath import testing

    root = tmp_path / "bucket"
    root.mkdir()

    def local(p):
        s = os.fspath(p)
        return str(root / s[len("gs://bucket/") :]) if s.startswith("gs://bucket") else s

    def redirect(orig, path, *args, **kwargs):
        return orig(local(path), *[local(a) if isinstance(a, str) else a for a in args], **kwargs)

    names = "copy exists glob isdir listdir makedirs mkdir open remove rename replace rmtree stat"
    monkeypatch.chdir(tmp_path)
    with testing.mock_epath(**{n: redirect for n in names.split()} | {"walk": None}):
        yield root
    assert not (tmp_path / "gs:").exists()  # nothing went through pathlib
