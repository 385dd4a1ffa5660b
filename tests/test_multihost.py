"""Groups that span hosts: a TP 2 x CP 2 prefill group (TP inside a host, CP across hosts) and a TP 2
decode group whose two TP ranks are on different hosts, each host's ranks started as one `ringserve`
process, the way the chart's LeaderWorkerSet starts them, joining their leader over an address that is
not loopback: the other "host" is a network namespace the test creates (a veth pair), or, where the
machine cannot make one (not root), 127.0.0.2 and 127.0.0.3 (Linux routes all of 127.0.0.0/8 to
loopback)."""

import contextlib
import os
import subprocess
import sys
import threading

import pytest

from ringserve import rpc
from ringserve.client import Client
from ringserve.engine.engine import Engine
from ringserve.engine.model import Llama
from ringserve.engine.sampling import SamplingParams
from ringserve.engine.tokenizer import Tokenizer
from ringserve.launch import start_cluster
from ringserve.process_group import free_port
from ringserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

LEADER_HOST = "127.0.0.2"  # the rank-link tests' leader address
PROMPTS = ["The capital of France is", "Once upon a time " * 40]  # the long one spreads over every rank


class Hosts:
    """Two "hosts": the leaders' (this network namespace, ``leader`` its address there) and the
    joining ranks' (``worker``: the address there, ``run``: how a command runs there); ``nic`` is each
    host's interface for gloo (GLOO_SOCKET_IFNAME, as on hosts with several interfaces)."""

    def __init__(self, leader: str, worker: str, prefix: list[str], nic: tuple[str, str]):
        self.leader, self.worker, self.prefix, self.nic = leader, worker, prefix, nic

    def run(self, argv: list[str]) -> list[str]:
        return [*self.prefix, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _make_netns(ns: str, here: str, there: str, subnet: str) -> None:
    _ip("netns", "add", ns)
    _ip("link", "add", here, "type", "veth", "peer", "name", there)
    _ip("link", "set", there, "netns", ns)
    _ip("addr", "add", f"{subnet}.1/24", "dev", here)
    _ip("link", "set", here, "up")
    inside = ["netns", "exec", ns, "ip"]
    _ip(*inside, "addr", "add", f"{subnet}.2/24", "dev", there)
    _ip(*inside, "link", "set", there, "up")
    _ip(*inside, "link", "set", "lo", "up")


def _remove_netns(ns: str, here: str) -> None:
    for cmd in (["link", "del", here], ["netns", "del", ns]):  # either may not exist
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _ip(*cmd)


@pytest.fixture
def hosts():
    """A network namespace joined to this one by a veth pair (10.231.N.1 here, .2 there), removed
    afterwards; 127.0.0.2 / 127.0.0.3 on loopback where it cannot be made (no root, no NET_ADMIN)."""
    pid = os.getpid()
    ns, here, there, subnet = f"rs-test-{pid}", f"rsh{pid}"[:15], f"rsn{pid}"[:15], f"10.231.{pid % 250}"
    try:
        _make_netns(ns, here, there, subnet)
    except (OSError, subprocess.CalledProcessError):
        _remove_netns(ns, here)
        yield Hosts("127.0.0.2", "127.0.0.3", [], ("lo", "lo"))
        return
    try:
        yield Hosts(f"{subnet}.1", f"{subnet}.2", ["ip", "netns", "exec", ns], (here, there))
    finally:
        _remove_netns(ns, here)


def test_tp_groups_whose_ranks_join_over_the_network_serve_exact_tokens(
    tmp_path, redis_server, gqa_dir, hosts, monkeypatch
):
    """Prefill TP 2 x CP 2: the leader runs ranks 0, 1 (CP rank 0's TP group), the other host ranks 2, 3
    (`--group-rank 1 --local-ranks 2`). Decode TP 2 x KVP 1: rank 1 alone on the other host. Tokens
    equal the single-process engine's; the joining ranks end when their leaders hang up."""
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    ports = {"prefill": free_port(hosts.leader), "decode": free_port(hosts.leader)}
    local = {"prefill": "2", "decode": "1"}  # ranks each leader runs; its group's other ranks join
    size = {"prefill": ["--tp", "2", "--cp", "2"], "decode": ["--tp", "2", "--kvp", "1"]}
    common = ["--deployment-secret-file", str(secret), "--kv-transfer", "tcp"]
    ranks: dict[str, subprocess.Popen] = {}
    logs = {role: tmp_path / f"{role}-host1.log" for role in ports}
    env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.nic[1]}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", hosts.nic[0])  # the leaders' host
    try:
        for role, port in ports.items():  # the joining ranks start first: they wait for their leader
            argv = [role, *size[role], "--group-rank", "1", "--local-ranks", local[role], "--model", str(gqa_dir)]
            argv += ["--group-leader", f"{hosts.leader}:{port}", "--host", hosts.worker, *common]
            with open(logs[role], "w") as log:
                ranks[role] = subprocess.Popen(
                    hosts.run([sys.executable, "-m", "ringserve.cli", *argv]),
                    stderr=log,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
        leader = {
            role: [*size[role][:2], "--local-ranks", local[role], "--group-host", hosts.leader]
            + ["--group-port", str(port), "--insecure", *common]
            for role, port in ports.items()
        }
        leader["decode"] += ["--shard-tokens", "32"]
        leader["prefill"] += ["--calibrate-tokens", "256"]  # a short start-up on a loaded machine
        cluster = start_cluster(
            cp=2,
            kvp=1,
            model=str(gqa_dir),
            host=hosts.leader,  # reachable from the other host: decode rank 0's KV receiver
            redis_url=redis_server.url,
            log_dir=str(tmp_path),
            extra={**leader, "router": ["--insecure"]},
        )
        try:
            with rpc.channel(cluster.prefill) as channel:
                info = prefill_pb2_grpc.PrefillStub(channel).GetInfo(prefill_pb2.GetPrefillInfoRequest(), timeout=10)
                assert (info.tp_size, info.cp_size) == (2, 2)
            with rpc.channel(cluster.decode) as channel:
                stub = decode_pb2_grpc.DecodeStub(channel)
                dinfo = stub.GetInfo(decode_pb2.GetDecodeInfoRequest(), timeout=10)
                assert (dinfo.tp_size, dinfo.kvp_size) == (2, 1)
                reserved = stub.Reserve(decode_pb2.ReserveRequest(request_id="where", prompt_tokens=100, max_tokens=4))
                # TP rank 1's KV receiver (KV head 1) is on the other host, as its own command line said.
                where = sorted((t.first_kv_head, t.address.rsplit(":", 1)[0]) for t in reserved.targets)
                assert where == [(0, hosts.leader), (1, hosts.worker)]
                assert stub.Release(decode_pb2.ReleaseRequest(request_id="where", landing_unused=True)).released
            engine = Engine(Llama.load(gqa_dir, progress=False), Tokenizer.from_checkpoint(gqa_dir))
            params = SamplingParams(max_tokens=12)
            with Client(cluster.router, timeout=180) as client:
                for prompt in PROMPTS:
                    ids = [e.token_id for e in engine.generate(engine.tokenizer.encode(prompt), params)]
                    got = [t for chunk in client.generate(prompt, max_tokens=12) for t in chunk.token_ids]
                    assert got == ids, prompt
        finally:
            cluster.stop()
        for role, proc in ranks.items():  # a host's ranks end when their leader hangs up
            assert proc.wait(timeout=60) == 0, logs[role].read_text()[-2000:]
            text = logs[role].read_text()
            joined = {r for r in range(4) if f"{role} rank {r} joined its leader at {hosts.leader}:" in text}
            assert joined == ({2, 3} if role == "prefill" else {1}), text[-2000:]
            assert f"torch.distributed at tcp://{hosts.leader}:" in text
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


def test_a_host_whose_ranks_fall_outside_the_group_is_refused_before_it_joins():
    """`--group-rank R --local-ranks L` names ranks R*L .. R*L+L-1 of TP x CP: past the last rank, refused."""
    from ringserve.config import PrefillConfig
    from ringserve.errors import InvalidArgument
    from ringserve.launch import run_rank
    from ringserve.prefill_service.rank import rank_main

    cfg = PrefillConfig(tp=2, cp=2, group_rank=2, local_ranks=2, group_leader=f"{LEADER_HOST}:1", device="cpu")
    with pytest.raises(InvalidArgument, match=r"ranks 4\.\.5, outside ranks 1\.\.3 of this group of 4 \(--tp 2 x 2\)"):
        run_rank(cfg, "prefill", cfg.cp, rank_main)
