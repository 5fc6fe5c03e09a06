"""Who may call the service and over what: API tokens and roles, the anonymous rules, the audit log,
TLS and mTLS for gRPC and DICOM (dcmtk's own TLS client), and the private index writer.

Certificates are made here with trustme; nothing is committed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.core.config import AccessSettings
from services.core.errors import ConfigError, PermissionDenied
from services.core.security import AccessPolicy, token_id
from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration
trustme = pytest.importorskip("trustme")


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def _server_files(ca, folder: Path) -> dict[str, Path]:
    """A certificate for 127.0.0.1 and localhost signed by ``ca``, its key, and the CA."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": folder / "server.pem", "key": folder / "server.key", "ca": folder / "ca.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


def _client_files(ca, folder: Path, name: str = "client") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(f"{name}.cbmir.test")
    pem, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    cert.private_key_pem.write_to_path(str(key))
    return pem, key


def cbmir(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(support.CBMIR), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


# --- tokens, roles, audit -------------------------------------------------------------------------


def test_tokens_roles_rotation_and_audit(data_dir, procs, tmp_path):
    search, admin, later = (secrets.token_hex(16) for _ in range(3))
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# cbmir API tokens\n{search}\n{admin} admin\n")
    env = support.base_env(data_dir, CBMIR_API_TOKENS_FILE=str(tokens))
    proc, port = support.start_query(env)
    procs.append(proc)
    target = f"127.0.0.1:{port}"
    find = lambda client: client.search(sop_instance_uid="1.2.3")  # noqa: E731
    # a token source is set: loopback callers need a token too
    assert _code(lambda: find(SearchClient(target))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: find(SearchClient(target, token="not-a-token"))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: find(SearchClient(target, token=search))) == grpc.StatusCode.NOT_FOUND  # allowed
    # roles: the statistics are the operators' (admin); a search token may only search
    assert _code(SearchClient(target, token=search).stats) == grpc.StatusCode.PERMISSION_DENIED
    assert SearchClient(target, token=admin).stats().total == 0
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # probes carry no token
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        assert (
            _code(lambda: list(stub.ServerReflectionInfo(request, timeout=10)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    # the installed command: nothing, a token without the role, --token, CBMIR_TOKEN
    without = cbmir("stats", "--server", target, env=env)
    assert without.returncode == 2 and "UNAUTHENTICATED" in without.stderr
    denied = cbmir("stats", "--server", target, "--token", search, env=env)
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr
    assert cbmir("stats", "--server", target, "--token", admin, env=env).returncode == 0
    assert cbmir("stats", "--server", target, env=dict(env, CBMIR_TOKEN=admin)).returncode == 0
    searched = cbmir("search", "--server", target, "--uid", "1.2.3", env=dict(env, CBMIR_TOKEN=search))
    assert "NOT_FOUND" in searched.stderr, searched.stderr
    # rotation: the file is re-read when it changes, no restart
    tokens.write_text(f"{later} admin\n")
    assert _code(lambda: find(SearchClient(target, token=search))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(SearchClient(target, token=admin).stats) == grpc.StatusCode.UNAUTHENTICATED
    assert SearchClient(target, token=later).stats().total == 0
    # a change that keeps size and modification time (cp -p, rsync -t) is a change too
    same_size = secrets.token_hex(16)
    before = tokens.stat()
    tokens.write_text(f"{same_size} admin\n")
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _code(SearchClient(target, token=later).stats) == grpc.StatusCode.UNAUTHENTICATED
    assert SearchClient(target, token=same_size).stats().total == 0
    # a malformed line is skipped and logged (not told to callers); what the file no longer holds
    # is revoked all the same
    tokens.write_text(f"{later} admin\nshort\n")
    assert SearchClient(target, token=later).stats().total == 0
    assert _code(SearchClient(target, token=same_size).stats) == grpc.StatusCode.UNAUTHENTICATED
    proc.wait_for(r"tokens line 2: a token must have at least 16 characters; that line is skipped")
    # the audit log names the caller by token id, never by token
    proc.wait_for(
        rf"cbmir\.audit: search caller={token_id(search)} kind=sop_instance_uid k=5 .*status=NOT_FOUND"
    )
    log = proc.output()
    assert all(token not in log for token in (search, admin, later, same_size))


def test_anonymous_callers_only_on_loopback_or_when_allowed(data_dir, caplog):
    # a network address without tokens: the real service refuses to start (before it binds anything)
    refused = cbmir("query", env=support.base_env(data_dir, CBMIR_GRPC_HOST="0.0.0.0", CBMIR_GRPC_PORT="0"))
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0" in refused.stderr
    none = AccessSettings(None, (), False)
    # the operator on this machine: anonymous callers on loopback hold admin (cbmir stats works)
    assert AccessPolicy.for_service(none, "127.0.0.1").anonymous_role == "admin"
    assert AccessPolicy.for_service(none, "::1").anonymous_role == "admin"
    with pytest.raises(ConfigError, match="CBMIR_ALLOW_ANONYMOUS"):
        AccessPolicy.for_service(none, "10.1.2.3")
    allowed = AccessPolicy.for_service(AccessSettings(None, (), True), "10.1.2.3")
    assert allowed.anonymous_role == "search" and "ANYONE WHO CAN REACH 10.1.2.3" in caplog.text
    with pytest.raises(PermissionDenied):  # anonymous network callers may search, not administer
        allowed.authorize((), "admin")
    assert allowed.authorize((), "search").token_id == "anonymous"
    tokens = AccessPolicy.for_service(AccessSettings(None, ("x" * 32,), True), "10.1.2.3")
    assert tokens.anonymous_role is None


# --- TLS ------------------------------------------------------------------------------------------


def test_grpc_tls_mtls_and_certificate_rotation(data_dir, procs, tmp_path, ca):
    files = _server_files(ca, tmp_path / "pki")
    client_pem, client_key = _client_files(ca, tmp_path / "pki")
    env = support.base_env(
        data_dir,
        CBMIR_TLS_CERT=str(files["cert"]),
        CBMIR_TLS_KEY=str(files["key"]),
        CBMIR_TLS_CLIENT_CA=str(files["ca"]),
    )
    proc, port = support.start_query(env)
    procs.append(proc)
    target = f"127.0.0.1:{port}"
    assert _code(SearchClient(target, timeout_s=5).stats) == grpc.StatusCode.UNAVAILABLE  # plaintext
    no_cert = SearchClient(target, timeout_s=5, tls_ca=files["ca"])
    assert _code(no_cert.stats) == grpc.StatusCode.UNAVAILABLE  # TLS, but no client certificate
    stranger_pem, stranger_key = _client_files(trustme.CA(), tmp_path / "other", "stranger")
    stranger = SearchClient(
        target, timeout_s=5, tls_ca=files["ca"], tls_cert=stranger_pem, tls_key=stranger_key
    )
    assert _code(stranger.stats) == grpc.StatusCode.UNAVAILABLE  # a certificate the CA did not sign
    assert (
        SearchClient(target, tls_ca=files["ca"], tls_cert=client_pem, tls_key=client_key).stats().total == 0
    )
    ok = cbmir(
        "stats",
        "--server",
        target,
        "--tls-ca",
        str(files["ca"]),
        "--tls-cert",
        str(client_pem),
        "--tls-key",
        str(client_key),
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    # rotation: a certificate from another CA, written over the files, is used by new connections
    new_ca = trustme.CA()
    rotated = new_ca.issue_cert("127.0.0.1", "localhost")
    new_ca_pem = tmp_path / "new-ca.pem"
    new_ca.cert_pem.write_to_path(str(new_ca_pem))
    trusting_new = {"tls_ca": new_ca_pem, "tls_cert": client_pem, "tls_key": client_key, "timeout_s": 5}
    assert _code(SearchClient(target, **trusting_new).stats) == grpc.StatusCode.UNAVAILABLE
    rotated.private_key_pem.write_to_path(str(files["key"]))
    rotated.cert_chain_pems[0].write_to_path(str(files["cert"]))
    assert SearchClient(target, **trusting_new).stats().total == 0


@pytest.mark.parametrize("receiver", support.RECEIVERS)
def test_dicom_tls_with_dcmtk(data_dir, procs, tmp_path, ca, need_dcmtk, receiver):
    """The TLS port (pynetdicom's with either network side) beside the plain one."""
    files = _server_files(ca, tmp_path / "pki")
    client_pem, client_key = _client_files(ca, tmp_path / "pki")
    env = support.base_env(
        data_dir,
        CBMIR_BROKER_URL=support.REDIS_URL,
        CBMIR_QUEUE=f"cbmir.test.{secrets.token_hex(5)}",
        CBMIR_DICOM_TLS_PORT="0",
        CBMIR_TLS_CERT=str(files["cert"]),
        CBMIR_TLS_KEY=str(files["key"]),
        CBMIR_TLS_CLIENT_CA=str(files["ca"]),
        **support.receiver_env(receiver),
    )
    proc, port = support.start_scp(env)
    procs.append(proc)
    tls_port = int(proc.wait_for(r"cbmir scp: TLS AE CBMIR listening on [^:]+:(\d+)").group(1))
    path = support.pydicom_file("MR_small.dcm")
    incoming = data_dir / "spool" / "incoming"
    dcmtk_env = dict(os.environ, TCP_NODELAY="1")

    def storescu(*options: str, to_port: int = tls_port) -> subprocess.CompletedProcess[str]:
        argv = ["storescu", *options, "-aec", "CBMIR", "127.0.0.1", str(to_port), str(path)]
        return subprocess.run(argv, env=dcmtk_env, capture_output=True, text=True, timeout=60, check=False)

    assert storescu().returncode != 0  # plain DICOM to the TLS port
    assert storescu("+tla", "+cf", str(files["ca"])).returncode != 0  # TLS without a client certificate
    assert not incoming.exists() or not list(incoming.iterdir())
    import socket

    # a client that connects and never starts its handshake must not hold up anyone else
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5):
        sent = storescu("+tls", str(client_key), str(client_pem), "+cf", str(files["ca"]))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert (incoming / f"{support.sop_uid(path)}.dcm").exists()
    assert storescu(to_port=port).returncode == 0  # the plain port still serves


def test_dicom_tls_only_serves_no_plain_port(data_dir, procs, tmp_path, ca, need_dcmtk):
    files = _server_files(ca, tmp_path / "pki")
    env = support.base_env(
        data_dir,
        CBMIR_BROKER_URL=support.REDIS_URL,
        CBMIR_QUEUE=f"cbmir.test.{secrets.token_hex(5)}",
        CBMIR_DICOM_TLS_PORT="0",
        CBMIR_DICOM_TLS_ONLY="1",
        CBMIR_TLS_CERT=str(files["cert"]),
        CBMIR_TLS_KEY=str(files["key"]),
    )
    proc = support.Proc("scp", [str(support.CBMIR), "scp"], dict(env, CBMIR_DICOM_PORT="0"))
    procs.append(proc)
    tls_port = int(proc.wait_for(r"cbmir scp: TLS AE CBMIR listening on [^:]+:(\d+)").group(1))
    assert "cbmir scp: AE CBMIR listening" not in proc.output()
    assert "(TLS port only)" in proc.output()
    path = support.pydicom_file("MR_small.dcm")
    argv = [
        "storescu",
        "+tla",
        "+cf",
        str(files["ca"]),
        "-aec",
        "CBMIR",
        "127.0.0.1",
        str(tls_port),
        str(path),
    ]
    sent = subprocess.run(
        argv, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, text=True, timeout=60
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    refused = cbmir("scp", env=dict(env, CBMIR_DICOM_TLS_PORT=""))
    assert refused.returncode == 2 and "CBMIR_DICOM_TLS_ONLY=1 needs CBMIR_DICOM_TLS_PORT" in refused.stderr


# --- the private index writer ---------------------------------------------------------------------


def _model_dim() -> int:
    from models.runtime import default_onnx_path, load_sidecars

    return int(load_sidecars(default_onnx_path())[0]["embedding_dim"])


def _point(uid: str, dim: int, **payload):
    from services.index import IndexPoint, point_id

    base = {
        "modality": "mri",
        "sop_instance_uid": uid,
        "study_instance_uid": "1.2.9",
        "series_instance_uid": "1.2.8",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "frame_number": 1,
    }
    return IndexPoint(point_id(uid), [0.5] * dim, {**base, **payload})


def test_index_writer_over_tcp_needs_its_token(data_dir, procs):
    from services.core.errors import ConfigError as Refused
    from services.index import RemoteIndexWriter

    writer_port = support.free_port()
    tcp = {"CBMIR_INDEX_WRITER": f"127.0.0.1:{writer_port}"}
    refused = cbmir("query", env=support.base_env(data_dir, CBMIR_GRPC_PORT="0", **tcp))
    assert refused.returncode == 2 and "CBMIR_WRITER_TOKEN" in refused.stderr
    token = secrets.token_hex(16)
    proc, port = support.start_query(support.base_env(data_dir, CBMIR_WRITER_TOKEN=token, **tcp))
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}")
    version, target = client.stats().model_version, f"127.0.0.1:{writer_port}"
    dim = _model_dim()
    for wrong in (None, "wrong-token-" + token):
        with pytest.raises(Refused, match="UNAUTHENTICATED"):
            RemoteIndexWriter(target, token=wrong, timeout_s=5).upsert([_point("1.2.3.1", dim)], version)
    RemoteIndexWriter(target, token=token, timeout_s=5).upsert([_point("1.2.3.1", dim)], version)
    assert client.stats().total == 1
    # off loopback, plain TCP would carry the writer token in clear: neither side allows it
    exposed = cbmir(
        "query",
        env=support.base_env(
            data_dir.parent / "exposed",
            CBMIR_GRPC_PORT="0",
            CBMIR_WRITER_TOKEN=token,
            CBMIR_INDEX_WRITER="0.0.0.0:0",
        ),
    )
    assert exposed.returncode == 2 and "in plain text over the network" in exposed.stderr
    with pytest.raises(Refused, match="must not cross the network in clear"):
        RemoteIndexWriter("10.9.8.7:50052", token=token)


def test_index_writer_refuses_points_the_index_must_never_hold(data_dir, procs):
    from services.core.errors import InvalidInput
    from services.index import IndexPoint, RemoteIndexWriter, point_id

    proc, port = support.start_query(support.base_env(data_dir))
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}")
    version = client.stats().model_version
    writer = RemoteIndexWriter(f"unix:{data_dir / 'index-writer.sock'}", timeout_s=10)
    dim = _model_dim()
    nan = _point("1.2.3.2", dim)
    bad = {
        "NaN": IndexPoint(nan.point_id, [float("nan")] * dim, nan.payload),
        "infinite": IndexPoint(nan.point_id, [np.inf] + [0.0] * (dim - 1), nan.payload),
        "dimension": IndexPoint(nan.point_id, [0.0] * (dim + 1), nan.payload),
        "PatientName": _point("1.2.3.3", dim, PatientName="Doe^Jane"),
        "another instance's point": IndexPoint(
            point_id("1.2.3.99"), [0.0] * dim, _point("1.2.3.4", dim).payload
        ),
        "not a UID": _point("not-a-uid", dim),
        "modality": _point("1.2.3.5", dim, modality="ct"),
        "modality_code": _point("1.2.3.7", dim, modality_code="DOE^JANE"),
        "frame_number": _point("1.2.3.8", dim, frame_number=2**40),  # a Hit's field is uint32
        "ingested_at": _point("1.2.3.9", dim, ingested_at=float("nan")),
        "spool_name": _point("1.2.3.10", dim, spool_name="Doe_Jane.dcm"),
    }
    for what, point in bad.items():
        with pytest.raises(InvalidInput, match="INVALID_ARGUMENT"):
            writer.upsert([point], version)
        assert client.stats().total == 0, what
    raw = writer._stub.UpsertPoints  # the payload is not even JSON
    from services.grpc_gen.cbmir.v1 import index_writer_pb2

    request = index_writer_pb2.UpsertPointsRequest(
        model_version=version,
        points=[
            index_writer_pb2.IndexedPoint(point_id=nan.point_id, vector=[0.0] * dim, payload_json="{nope")
        ],
    )
    assert _code(lambda: raw(request, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    writer.upsert([_point("1.2.3.6", dim)], version)
    assert client.stats().total == 1
