"""Groups that span hosts: each rank of a prefill (CP) and a decode (KVP) group is its own `ringserve`
process, started the way a LeaderWorkerSet starts them, joining its leader over an address that is
not 127.0.0.1 (127.0.0.2: Linux routes all of 127.0.0.0/8 to loopback, no setup needed)."""

import os
import subprocess
import sys
import threading

from ringserve import rpc
from ringserve.client import Client
from ringserve.engine.engine import Engine
from ringserve.engine.sampling import SamplingParams
from ringserve.launch import start_cluster
from ringserve.process_group import free_port
from ringserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

LEADER_HOST = "127.0.0.2"  # the leaders' --group-host: rank link and torch.distributed rendezvous
WORKER_HOST = "127.0.0.3"  # the other "host": where the joining ranks listen (the decode rank's KV receiver)
PROMPTS = ["The capital of France is", "Once upon a time " * 40]  # the long one spreads over every rank


def test_cp2_and_kvp2_groups_whose_ranks_join_over_the_network_serve_exact_tokens(
    tmp_path, redis_server, default_model
):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    ports = {"prefill": free_port(LEADER_HOST), "decode": free_port(LEADER_HOST)}
    size = {"prefill": ["--cp", "2"], "decode": ["--kvp", "2"]}
    common = ["--deployment-secret-file", str(secret), "--kv-transfer", "tcp"]
    ranks: dict[str, subprocess.Popen] = {}
    logs = {role: tmp_path / f"{role}-rank1.log" for role in ports}
    try:
        for role, port in ports.items():  # the joining ranks start first: they wait for their leader
            argv = [role, *size[role], "--group-rank", "1", "--group-leader", f"{LEADER_HOST}:{port}"]
            with open(logs[role], "w") as log:
                ranks[role] = subprocess.Popen(
                    [sys.executable, "-m", "ringserve.cli", *argv, "--host", WORKER_HOST, *common],
                    stderr=log,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
        leader = {
            role: ["--local-ranks", "1", "--group-host", LEADER_HOST, "--group-port", str(port), *common]
            for role, port in ports.items()
        }
        leader["decode"] += ["--shard-tokens", "32"]
        leader["prefill"] += ["--calibrate-tokens", "256"]  # a short start-up on a loaded machine
        cluster = start_cluster(
            cp=2,
            kvp=2,
            redis_url=redis_server.url,
            log_dir=str(tmp_path),
            extra={**leader, "router": []},
        )
        try:
            with rpc.channel(cluster.prefill) as channel:
                info = prefill_pb2_grpc.PrefillStub(channel).GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10)
                assert info.cp_size == 2
            with rpc.channel(cluster.decode) as channel:
                stub = decode_pb2_grpc.DecodeStub(channel)
                assert stub.GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10).kvp_size == 2
                reserved = stub.Reserve(decode_pb2.ReserveRequest(request_id="where", prompt_tokens=100, max_tokens=4))
                # Rank 1's KV receiver is on the other "host", as its own command line said.
                assert sorted(t.address.rsplit(":", 1)[0] for t in reserved.targets) == ["127.0.0.1", WORKER_HOST]
                assert stub.Release(decode_pb2.ReleaseRequest(request_id="where", landing_unused=True)).released
            model, tokenizer = default_model
            engine = Engine(model, tokenizer)
            with Client(cluster.router, timeout=180) as client:
                for prompt in PROMPTS:
                    ids = [e.token_id for e in engine.generate(tokenizer.encode(prompt), SamplingParams(max_tokens=12))]
                    got = [t for chunk in client.generate(prompt, max_tokens=12) for t in chunk.token_ids]
                    assert got == ids, prompt
        finally:
            cluster.stop()
        for role, proc in ranks.items():  # a rank ends when its leader hangs up
            assert proc.wait(timeout=60) == 0, logs[role].read_text()[-2000:]
            assert f"torch.distributed at tcp://{LEADER_HOST}:" in logs[role].read_text()
    finally:
        for proc in ranks.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def test_the_rank_link_names_missing_ranks_refuses_a_wrong_key_and_reports_a_lost_rank():
    """The leader waits for every rank and names the ones that never came; a rank with another
    deployment secret is refused; a rank whose process ends arrives as RankLost (EOF, no polling)."""
    import pytest

    from ringserve.errors import PermissionDenied, Unavailable
    from ringserve.rank_link import LeaderLink, RankLost, join_group, link_key

    secret = b"0123456789abcdef0123456789abcdef"
    alone = LeaderLink("prefill", 3, LEADER_HOST, 0, secret)
    with pytest.raises(
        Unavailable, match=r"rank\(s\) 1, 2 of 3 did not join at 127\.0\.0\.2:\d+ within 1 s.*--group-rank"
    ):
        alone.admit(None, timeout_s=1.0)
    alone.close()

    leader = LeaderLink("decode", 2, LEADER_HOST, 0, secret)
    admitted: list[BaseException | None] = []
    admitting = threading.Thread(target=lambda: admitted.append(_admit(leader, {"world": 2})))
    admitting.start()
    rank = None
    try:
        with pytest.raises(PermissionDenied, match="same deployment secret"):
            join_group(leader.address, 1, 2, link_key(b"another-secret-of-16-bytes-or-more"), timeout_s=60)
        rank = subprocess.Popen(
            [sys.executable, "-c", JOIN_AND_EXIT, leader.address, secret.decode()], stderr=subprocess.PIPE, text=True
        )
        admitting.join(timeout=120)
        assert admitted == [None]
        assert leader.messages.get(timeout=60) == (1, "hello from rank 1 of {'world': 2}")
        leader.send(1, "bye")
        assert leader.messages.get(timeout=60) == (1, RankLost(1, "decode-rank1 (remote)"))
        assert rank.wait(timeout=60) == 0, rank.stderr.read()
    finally:
        leader.close()
        admitting.join(timeout=120)
        if rank is not None and rank.poll() is None:
            rank.kill()
            rank.wait()


def _admit(leader, config) -> BaseException | None:
    try:
        leader.admit(config, timeout_s=120)
    except BaseException as e:  # the test thread asserts on it
        return e
    return None


# A rank in a process of its own: join, say hello with the config it was given, exit when told.
JOIN_AND_EXIT = """
import sys
from ringserve.rank_link import join_group, link_key
link = join_group(sys.argv[1], 1, 2, link_key(sys.argv[2].encode()), timeout_s=60)
link.send(f"hello from rank 1 of {link.config}")
assert link.recv() == "bye"
"""
