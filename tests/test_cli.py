"""`ringserve generate` as a user runs it: a subprocess. Stdout holds only the generated text;
mistakes give one `ringserve: error:` line on stderr, a non-zero exit, and no traceback.

The subprocesses inherit RINGSERVE_CACHE_DIR from the session fixture, and ``default_model``
converts the GGUF there first, so each load reads the converted copy (a few seconds).
"""

import os
import subprocess
import sys

import pytest

from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams

FRANCE = "The capital of France is"


def ringserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    assert os.environ.get("RINGSERVE_CACHE_DIR")  # set by conftest: never convert into ~/.cache
    return subprocess.run(
        [sys.executable, "-m", "ringserve.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one `ringserve: error:` line (the last one) naming ``words``, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ringserve: error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def engine(default_model) -> Engine:
    return Engine(*default_model, num_blocks=4)


def expected_text(engine: Engine, prompt_ids: list[int], max_tokens: int) -> str:
    return "".join(e.text for e in engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens)))


def test_generate_prints_only_the_text(engine):
    proc = ringserve("generate", FRANCE, "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    want = expected_text(engine, engine.tokenizer.encode(FRANCE), 8)
    assert want.startswith(" Paris.")
    assert proc.stdout == want + "\n"
    # Logs and the loading progress bar went to stderr.
    assert "loading model" in proc.stderr and "tensor" in proc.stderr
    assert "finish: length" in proc.stderr


def test_chat_quiet_and_stdin(engine):
    question = "What is the capital of France?"
    proc = ringserve("-q", "generate", "-", "--chat", "--max-tokens", "12", stdin=question)
    assert proc.returncode == 0, proc.stderr
    tok = engine.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    want = expected_text(engine, tok.encode(chat, add_special_tokens=False), 12)
    assert "Paris" in want
    assert proc.stdout == want + "\n"
    # -q: no INFO logs and no progress bar.
    assert "INFO" not in proc.stderr and "tensor/s" not in proc.stderr


@pytest.mark.parametrize(
    "args,words",
    [
        (["--temperature", "-1"], ["temperature", "-1"]),
        (["--top-p", "0"], ["top_p"]),
        (["--max-tokens", "0"], ["max_tokens"]),
        (["--prefill-chunk", "0"], ["--prefill-chunk"]),
        (["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
        (["--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf", "does not exist"]),
    ],
    ids=["temperature", "top-p", "max-tokens", "prefill-chunk", "device-cuda", "missing-model"],
)
def test_bad_options_fail_before_the_model_load(args, words):
    proc = ringserve("generate", FRANCE, *args)
    assert_user_error(proc, *words)
    assert "loading" not in proc.stderr  # rejected before any load started


def test_empty_prompt_fails_before_the_model_load():
    proc = ringserve("generate", "-", stdin="")
    assert_user_error(proc, "prompt is empty")
    assert "loading" not in proc.stderr


def test_truncated_gguf(tmp_path, default_gguf):
    half = tmp_path / "half.gguf"
    with open(default_gguf, "rb") as src:
        half.write_bytes(src.read(default_gguf.stat().st_size // 2))
    assert_user_error(ringserve("generate", FRANCE, "--model", str(half)), "half.gguf", "truncated")


def test_prompt_longer_than_the_context(engine):
    prompt = "one two three four five six seven eight " * 1100
    assert len(engine.tokenizer.encode(prompt)) > engine.max_context
    assert_user_error(ringserve("-q", "generate", "-", stdin=prompt), "context is 8192")


@pytest.mark.parametrize("value", ["4294967296", "-1"])
def test_out_of_range_max_tokens_through_a_router_is_a_user_error(value):
    """`--url`: a value the API cannot carry is refused before anything is sent (no router needed)."""
    from ringserve.launch import free_port

    proc = ringserve("generate", "--url", f"127.0.0.1:{free_port()}", FRANCE, "--max-tokens", value)
    assert_user_error(proc, "max_tokens", value)
