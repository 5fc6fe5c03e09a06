"""The gRPC query service over a socket: status codes for bad requests, health, reflection."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from services.grpc_gen.cbmir.v1 import index_writer_pb2, index_writer_pb2_grpc, search_pb2
from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration


@pytest.fixture
def query(data_dir, procs):
    env = support.base_env(data_dir)
    proc, port = support.start_query(env)
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}")
    yield client, port, proc
    client.close()


def _writer_target(data_dir) -> str:
    """The index writer's default address: a Unix socket in the data folder."""
    return f"unix:{data_dir / 'index-writer.sock'}"


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that announces a picture of ``width`` x ``height`` (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"sop_instance_uid": "1.2.3", "k": 1001}, "k must be between 1 and 1000"),
        ({}, "names no query"),
        ({"dicom": b"this is not DICOM at all" * 10}, ""),
        ({"image": b"\x89PNG\r\n\x1a\n broken", "image_modality": "xray"}, ""),
        ({"image": _png()}, "image.modality must be set"),
        ({"image": _png_header(20000, 20000), "image_modality": "xray"}, "image too large"),
        ({"image": _png(), "image_modality": "xray", "exclude_same_study": True}, "exclude_same_study"),
        ({"sop_instance_uid": "   "}, "sop_instance_uid is empty"),
    ],
)
def test_bad_requests_are_invalid_argument(query, kwargs, fragment):
    client, _, _ = query
    code, details = _code(lambda: client.search(**kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert fragment in details
    assert "Traceback" not in details


def test_unknown_modality_enum_is_invalid_argument(query):
    _, port, _ = query
    from services.grpc_gen.cbmir.v1 import search_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = search_pb2_grpc.SimilarCasesStub(channel)
        request = search_pb2.SearchSimilarRequest(sop_instance_uid="1.2.3", modalities=[42])
        code, details = _code(lambda: stub.SearchSimilar(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown modality" in details


def test_unknown_uid_is_not_found(query):
    client, _, _ = query
    code, details = _code(lambda: client.search(sop_instance_uid="1.2.826.0.1.999"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "1.2.826.0.1.999" in details


def test_png_query_on_empty_index_returns_no_hits(query):
    client, _, _ = query
    response = client.search(image=_png(), image_modality="xray", k=5)
    assert list(response.hits) == []
    assert response.query_modality == search_pb2.MODALITY_XRAY


def test_health_and_reflection(query):
    _, port, _ = query
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cbmir.v1.SimilarCases"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"cbmir.v1.SimilarCases", "grpc.health.v1.Health"} <= names
    assert "cbmir.v1.IndexWriter" not in names  # private: not on the public port, not advertised


def test_the_public_port_does_not_serve_the_index_writer(query, data_dir):
    client, port, _ = query
    request = index_writer_pb2.UpsertPointsRequest(model_version=client.stats().model_version)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        code, _ = _code(
            lambda: index_writer_pb2_grpc.IndexWriterStub(channel).UpsertPoints(request, timeout=10)
        )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    socket_path = data_dir / "index-writer.sock"
    assert socket_path.is_socket() and (socket_path.stat().st_mode & 0o777) == 0o600


def test_index_writer_refuses_another_model_version(query, data_dir):
    client, _, _ = query
    with grpc.insecure_channel(_writer_target(data_dir)) as channel:
        writer = index_writer_pb2_grpc.IndexWriterStub(channel)
        request = index_writer_pb2.UpsertPointsRequest(
            model_version="some-other-model",
            points=[
                index_writer_pb2.IndexedPoint(
                    point_id="6f1c4a5e-0000-5000-8000-000000000001",
                    vector=[0.0] * 4,
                    payload_json=json.dumps({"modality": "xray"}),
                )
            ],
        )
        code, details = _code(lambda: writer.UpsertPoints(request, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "reindex" in details
    assert client.stats().total == 0


def test_backend_down_is_unavailable(data_dir, procs):
    """With a Qdrant server configured but unreachable, the service runs and answers UNAVAILABLE."""
    env = support.base_env(data_dir, QDRANT_URL=f"http://127.0.0.1:{support.free_port()}")
    proc, port = support.start_query(env)
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}")
    for call in (lambda: client.search(sop_instance_uid="1.2.3"), client.stats):
        code, details = _code(call)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "Traceback" not in details
    assert proc.process.poll() is None


def test_the_workers_index_writer_classifies_the_owners_answers(query, data_dir):
    """What a worker makes of the index owner's status codes: points that will never be accepted
    are InvalidInput (quarantine), another model is ConfigError, no owner is BackendUnavailable."""
    from services.core.errors import BackendUnavailable, ConfigError, InvalidInput
    from services.index import IndexPoint, RemoteIndexWriter, point_id

    client, _, _ = query
    version = client.stats().model_version
    writer = RemoteIndexWriter(_writer_target(data_dir), timeout_s=10)
    point = IndexPoint(point_id("1.2.3.4"), [0.0] * 3, {"modality": "xray", "sop_instance_uid": "1.2.3.4"})
    with pytest.raises(InvalidInput, match="INVALID_ARGUMENT"):
        writer.upsert([point], version)  # 3 values; the index holds the model's dimension
    with pytest.raises(ConfigError, match="FAILED_PRECONDITION"):
        writer.upsert([point], "some-other-model")
    writer.close()
    nobody = RemoteIndexWriter(f"127.0.0.1:{support.free_port()}", timeout_s=5)
    with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
        nobody.upsert([point], version)
    nobody.close()
    assert client.stats().total == 0
