"""Groups that span hosts: each rank of a prefill (CP) and a decode (KVP) group is its own `ringserve`
process, started the way a LeaderWorkerSet starts them, joining its leader over an address that is
not 127.0.0.1 (127.0.0.2: Linux routes all of 127.0.0.0/8 to loopback, no setup needed)."""

import os
import subprocess
import sys

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
