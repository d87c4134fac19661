"""TLS of the selection service over real gRPC on loopback, with a PKI made in the test:
a TLS client works (Select, ReportKV, Feedback, async), a plaintext client and a client that
trusts another CA are refused and change nothing; settings are validated; the CLI serves TLS."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from tls_certs import Pki, make_pki

from cluster.selector.client import AsyncSelectorClient, SelectorClient
from cluster.selector.grpc_tls import ClientTLS, TLSSettings, channel
from cluster.selector.reporter import KVReporter
from cluster.selector.server import ServerThread
from cluster.selector.types import Outcome
from cluster.serve.app_config import SelectorSettings
from kvmanager.events import BlockStored
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

TOKEN = "tls-t0k"
MD = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[ServerThread]:
    tls = TLSSettings(cert_file=str(pki.cert_file), key_file=str(pki.key_file)).server()
    assert tls is not None
    with ServerThread(token=TOKEN, tls=tls) as st:
        yield st


def _client_tls(pki: Pki, server_name: str = "") -> ClientTLS:
    tls = TLSSettings(ca_file=str(pki.ca_file), server_name=server_name).client()
    assert tls is not None
    return tls


def _wait(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _ping_code(ch: grpc.Channel) -> grpc.StatusCode | None:
    try:
        pb_grpc.CacheSelectionStub(ch).Ping(pb.PingRequest(), timeout=5, metadata=MD)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return None


def test_tls_client_reports_selects_and_feeds_back(server: ServerThread, pki: Pki) -> None:
    tls = _client_tls(pki)
    rep = KVReporter(server.address, "tls-r1", resident_hashes=lambda: [11, 12],
                     hello=pb.ReplicaHello(block_size=16, num_blocks=64), token=TOKEN,
                     heartbeat_s=0.2, tls=tls).start()
    try:
        _wait(lambda: any(r.replica_id == "tls-r1" and r.num_resident_blocks == 2
                          for r in server.core.list_replicas()))
        rep.publish([BlockStored([13], 12, [], 16)])
        _wait(lambda: any(r.replica_id == "tls-r1" and r.num_resident_blocks == 3
                          for r in server.core.list_replicas()))
    finally:
        rep.stop()
    client = SelectorClient(server.address, token=TOKEN, timeout_s=5.0, tls=tls)
    try:
        sel = client.select([11, 12, 13], 48, candidate_replica_ids=["tls-r1"])
        assert sel is not None and sel.ranked[0].replica_id == "tls-r1"
        assert sel.ranked[0].terms.num_matched_blocks == 3
        assert client.feedback(Outcome("q1", "tls-r1", 48, 48, 0.01, 1))
    finally:
        client.close()

    async def run() -> int:
        aclient = AsyncSelectorClient(server.address, token=TOKEN, timeout_s=5.0, tls=tls)
        try:
            asel = await aclient.select([11, 12], 32, candidate_replica_ids=["tls-r1"])
            assert asel is not None
            return asel.ranked[0].terms.num_matched_blocks
        finally:
            await aclient.close()

    assert asyncio.run(run()) == 2


def test_plaintext_client_is_refused_and_reports_nothing(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as ch:
        assert _ping_code(ch) == grpc.StatusCode.UNAVAILABLE
        stub = pb_grpc.CacheSelectionStub(ch)
        msgs = [pb.ReportKVRequest(replica_id="plain", hello=pb.ReplicaHello(block_size=16))]
        with pytest.raises(grpc.RpcError) as info:
            stub.ReportKV(iter(msgs), timeout=5, metadata=MD)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # the client helpers treat it as an outage: the router would route by power-of-two
    client = SelectorClient(server.address, token=TOKEN, timeout_s=2.0)
    try:
        assert client.select([1, 2], 32, candidate_replica_ids=["plain"]) is None
    finally:
        client.close()
    assert "plain" not in {r.replica_id for r in server.core.list_replicas()}


def test_client_trusting_another_ca_is_refused(server: ServerThread, other_ca: Pki) -> None:
    with channel(server.address, _client_tls(other_ca)) as ch:
        assert _ping_code(ch) == grpc.StatusCode.UNAVAILABLE


def test_server_name_override(tmp_path: Path) -> None:
    # A certificate that names only "selector.internal": dialling 127.0.0.1 needs the override.
    named = make_pki(tmp_path / "named", dns_names=("selector.internal",), ips=())
    tls = TLSSettings(cert_file=str(named.cert_file), key_file=str(named.key_file)).server()
    with ServerThread(token=TOKEN, tls=tls) as st:
        with channel(st.address, _client_tls(named)) as ch:
            assert _ping_code(ch) == grpc.StatusCode.UNAVAILABLE
        with channel(st.address, _client_tls(named, "selector.internal")) as ch:
            assert _ping_code(ch) is None


def test_settings_are_validated(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        TLSSettings(cert_file=str(pki.cert_file))
    with pytest.raises(ValidationError, match=r"tls\.ca_file .* cannot be read"):
        TLSSettings(ca_file=str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match=r"tls\.cert_file .* holds no PEM CERTIFICATE"):
        TLSSettings(cert_file=str(junk), key_file=str(pki.key_file))
    with pytest.raises(ValidationError, match=r"tls\.key_file .* holds no PEM PRIVATE KEY"):
        TLSSettings(cert_file=str(pki.cert_file), key_file=str(pki.cert_file))
    with pytest.raises(ValidationError, match="server_name needs ca_file"):
        TLSSettings(server_name="x")
    # the app both serves and dials: all three files or none
    with pytest.raises(ValidationError, match="cert_file, key_file and ca_file together"):
        SelectorSettings(tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)})
    ok = SelectorSettings(tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file),
                               "ca_file": str(pki.ca_file)})
    assert ok.tls.enabled and not SelectorSettings().tls.enabled
    assert "PRIVATE" not in repr(ok.tls.server())  # the key never shows in logs


def test_build_app_hands_tls_bytes_not_paths(pki: Pki) -> None:
    pytest.importorskip("ray.serve")
    from cluster.serve.app import build_app

    tls = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file),
           "ca_file": str(pki.ca_file)}
    app = build_app({"selector": {"tls": tls}})
    ingress = app._bound_deployment
    llm = ingress.init_args[0]._bound_deployment
    selector = llm.init_args[1]._bound_deployment
    settings, _token, server_tls, client_tls = selector.init_args
    assert "tls" not in settings and "tls" not in ingress.init_args[1]["selector"]
    assert server_tls.cert_chain == pki.cert_file.read_bytes()
    assert client_tls.root_certificates == pki.ca_file.read_bytes()
    assert llm.init_args[2].tls == client_tls  # the replicas' sink dials with the same CA


@pytest.mark.slow
def test_cli_serves_tls(pki: Pki) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.selector", "--port", "0", "--token", TOKEN,
         "--tls-cert", str(pki.cert_file), "--tls-key", str(pki.key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while "listening on" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "selector exited early"
            assert time.monotonic() < deadline
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, line
        with channel(match.group(1), _client_tls(pki)) as ch:
            assert _ping_code(ch) is None
        with grpc.insecure_channel(match.group(1)) as ch:
            assert _ping_code(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_a_key_without_a_cert(pki: Pki) -> None:
    out = subprocess.run([sys.executable, "-m", "cluster.selector.server", "--tls-key", str(pki.key_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cert_file and key_file go together" in out.stderr
