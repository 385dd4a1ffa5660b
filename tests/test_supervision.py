"""`ringserve up` owns its children: real `up` processes, real services, real signals.

Every process `up` starts inherits the environment, so a marker variable set on `up` finds all of
them (ranks and redis-server included) in /proc, wherever they were reparented."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc

from ringserve.client import Client
from ringserve.process_group import free_port

MARK = "RINGSERVE_TEST_UP"


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``MARK=mark``."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours
                pass
    return found


def start_up(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path, str]:
    mark = uuid.uuid4().hex
    log = tmp_path / "up.log"
    env = {**os.environ, MARK: mark, "RINGSERVE_CALIBRATE_TOKENS": "64"}  # a short prefill calibration
    cmd = [sys.executable, "-m", "ringserve.cli", "up", "--port", "0", "--redis-port", "0", "--http-port", "0", *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, env=env, text=True)
    return proc, log, mark


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout_s: float) -> str:
    """The first line of ``log`` containing ``text``; fail if ``proc`` exits first or it takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if text in line:
                return line
        assert proc.poll() is None, f"`up` exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the log within {timeout_s} s:\n{log.read_text()[-3000:]}")


def assert_none_left(mark: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while marked_pids(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_pids(mark) == [], "processes `up` started are still running"


def test_bad_flags_fail_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--kvp", "-1"], "--kvp"),
            (["--dtype", "int4"], "--dtype"),
            (["--redis-url", f"redis://127.0.0.1:{free_port()}/0"], "cannot reach Redis"),
            (["--port", str(port)], "in use"),
        ]
        for flags, words in cases:
            mark = uuid.uuid4().hex
            cmd = [sys.executable, "-m", "ringserve.cli", "up", "--http-port", "0", *flags]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, MARK: mark})
            assert p.returncode == 2, p.stderr
            assert "ringserve: error:" in p.stderr and words in p.stderr, p.stderr
            assert "Traceback" not in p.stderr and "started" not in p.stderr, p.stderr
            assert marked_pids(mark) == []


def test_sigterm_during_start_up_leaves_no_process(tmp_path):
    proc, log, mark = start_up(tmp_path, "--cp", "1")
    try:
        wait_for_line(proc, log, "started router", timeout_s=120)  # Redis and both groups are starting
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert_none_left(mark)


def test_a_killed_decode_group_is_restarted_and_up_keeps_serving(tmp_path, default_model):
    # default_model: the GGUF is converted once in this session's cache, so the services load it fast.
    proc, log, mark = start_up(tmp_path, "--cp", "1")
    try:
        wait_for_line(proc, log, "ringserve is up", timeout_s=400)
        router = proc.stdout.readline().strip()
        decode_pid = int(wait_for_line(proc, log, "started decode (pid", 1).split("(pid ")[1].split(")")[0])

        os.kill(decode_pid, signal.SIGKILL)
        wait_for_line(proc, log, f"the decode service (pid {decode_pid}) exited with code -9; restarting", 30)
        wait_for_line(proc, log, "decode is serving again", timeout_s=300)
        assert proc.poll() is None

        deadline = time.monotonic() + 60  # the router sees the new registration within a refresh or two
        while True:
            try:
                with Client(router, timeout=120) as client:
                    text = "".join(c.text for c in client.generate("The capital of France is", max_tokens=3))
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert "Paris" in text

        # The first SIGTERM drains: a running stream goes on (past the 15 s `up` used to allow);
        # a second one kills everything at once.
        chunks, errors = [], []

        def stream():
            try:
                with Client(router, timeout=600) as client:
                    chunks.extend(client.generate("Tell me a story.", max_tokens=2000, ignore_eos=True))
            except grpc.RpcError as e:
                errors.append(e)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        while not chunks:
            assert reader.is_alive() and proc.poll() is None, errors
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(20)
        streamed = len(chunks)
        time.sleep(2)
        assert proc.poll() is None and not errors and len(chunks) > streamed, "the stream goes on while up drains"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=60)
        assert errors, "killed: the stream ends"
    finally:
        proc.kill()
    assert_none_left(mark)
