"""The HTTP gateway against a real ``cbmir serve --http-port 0`` (the installed command), over sockets.

Instances of two patients (two studies each, two MR images per study) and a CT go in over a real
DICOM association (dcmtk's storescu). The tests then use the JSON API as a browser or a script
would: health, statistics, searches by UID, by uploaded DICOM (base64 JSON and multipart) and by
picture, study grouping, thumbnails with their ETag, and every kind of bad input, each answered
with its HTTP status and the error body. The OpenAPI document is fuzzed with schemathesis, and the
committed copy must be the application's.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
from PIL import Image

from services.core.errors import BackendUnavailable, ConfigError, InvalidInput, NotFound, TooLarge
from services.gateway import api
from services.gateway.app import _accepts_png, _matches, _render_size
from services.gateway.errors import HTTP_STATUS, code_for, http_status
from services.gateway.openapi import render
from tests import support

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SECRET = "gateway-test-patient-secret-0123456789"
MAX_BYTES = 128 * 1024  # CBMIR_QUERY_MAX_BYTES of the served parts: uploads over it are 413
READY = r"cbmir serve: ready dicom=([^:]+):(\d+) ae=(\S+) grpc=(\S+) .* http=([^:\s]+):(\d+)$"


# --- a served system with indexed instances (also used by tests/test_panel.py) ------------------------


@dataclass
class Served:
    """A running ``cbmir serve --http-port 0`` with its tokens and what was indexed."""

    proc: support.Proc
    base: str
    grpc_port: int
    search_token: str
    admin_token: str
    cases: dict[str, dict[str, str]] = field(default_factory=dict)  # file name -> UIDs and patient
    files: dict[str, Path] = field(default_factory=dict)

    def client(self, token: str | None = "search") -> httpx.Client:
        """An HTTP client of the gateway sending the search token (``"admin"``, None: no token, or a
        literal token)."""
        value = {"search": self.search_token, "admin": self.admin_token}.get(token or "", token)
        headers = {"Authorization": f"Bearer {value}"} if value else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)


def build_cases(folder: Path) -> tuple[dict[str, dict[str, str]], dict[str, Path]]:
    """2 patients x 2 studies x 2 MR images (images of one study alike), and pydicom's CT."""
    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    del template[0xFFFCFFFC]
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict[str, str]] = {}
    files: dict[str, Path] = {}
    for p, patient in enumerate(("PAT-A", "PAT-B")):
        for s in range(2):
            study, series = generate_uid(), generate_uid()
            base = rng.integers(0, 4096, (64, 64)).astype(np.int64)
            for i in range(2):
                ds = template.copy()
                ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.StudyDate = f"2023{p + 1:02d}{s + 10:02d}"
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.Rows = ds.Columns = 64
                ds.PixelData = (
                    np.clip(base + rng.integers(-40, 40, (64, 64)), 0, 4095).astype(np.uint16).tobytes()
                )
                name = f"{patient}-{s}-{i}.dcm"
                ds.save_as(folder / name, enforce_file_format=True)
                files[name] = folder / name
                cases[name] = {"sop": ds.SOPInstanceUID, "study": study, "series": series, "patient": patient}
    ct = support.pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(ct, stop_before_pixels=True)
    files[ct.name] = ct
    cases[ct.name] = {
        "sop": str(ds.SOPInstanceUID),
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "patient": "CT",
    }
    return cases, files


def serve_with_gateway(folder: Path, **extra_env: str) -> Served:
    """``cbmir serve --http-port 0`` in ``folder`` with a search and an admin token, the instances of
    :func:`build_cases` sent with storescu and indexed."""
    if not support.dcmtk_available():
        if os.environ.get("CI"):
            pytest.fail("dcmtk (storescu) is not installed")
        pytest.skip("dcmtk (storescu) is not installed")
    search_token, admin_token = secrets.token_hex(16), secrets.token_hex(16)
    tokens = folder / "tokens"
    tokens.write_text(f"{search_token} search\n{admin_token} admin\n")
    data_dir = folder / "data"
    data_dir.mkdir()
    env = support.base_env(
        data_dir,
        CBMIR_API_TOKENS_FILE=str(tokens),
        CBMIR_PATIENT_KEY_SECRET=SECRET,
        CBMIR_QUERY_MAX_BYTES=str(MAX_BYTES),
        **extra_env,
    )
    argv = [str(support.CBMIR), "serve", "--data-dir", str(data_dir), "--dicom-port", "0", "--grpc-port", "0"]
    proc = support.Proc("serve", [*argv, "--http-port", "0"], env)
    try:
        ready = proc.wait_for(READY, timeout_s=120)
        served = Served(
            proc,
            base=f"http://{ready.group(5)}:{ready.group(6)}",
            grpc_port=int(ready.group(4).rsplit(":", 1)[1]),
            search_token=search_token,
            admin_token=admin_token,
        )
        served.cases, served.files = build_cases(folder / "cases")
        support.storescu(int(ready.group(2)), list(served.files.values()))
        with served.client("admin") as http:
            support.wait_until(
                lambda: http.get("/v1/stats").json().get("total") == len(served.files), 180, "all indexed"
            )
    except BaseException:
        proc.stop()
        raise
    return served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    served = serve_with_gateway(tmp_path_factory.mktemp("gateway"))
    yield served
    served.proc.stop()
    assert "Traceback" not in served.proc.output(), served.proc.output()


def _error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """Assert the error status and body; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def _png(path: Path) -> bytes:
    """The pixels of a DICOM file as an 8-bit greyscale PNG."""
    import pydicom

    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    pixels = (pixels - pixels.min()) / max(1.0, float(np.ptp(pixels))) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- health, statistics, access ---------------------------------------------------------------------


def test_health_and_stats(served: Served) -> None:
    with served.client(None) as anonymous:
        health = anonymous.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "serving"}
        assert "default-src 'self'" in health.headers["content-security-policy"]
        _error(anonymous.get("/v1/stats"), 401, "UNAUTHENTICATED")
    with served.client("admin") as admin:
        stats = admin.get("/v1/stats")
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["total"] == len(served.files)
    assert body["per_modality"] == {"mri": 8, "other": 1}
    assert body["quarantined"] == 0 and body["pending"] == 0
    assert body["model_version"] and body["collection"]
    assert body["library"] == 0 and body["library_findings"] == []
    assert stats.headers["cache-control"] == "no-store"


def test_tokens_and_roles(served: Served) -> None:
    uid = served.cases["PAT-A-0-0.dcm"]["sop"]
    for token in (None, "not-a-valid-token-at-all"):
        with served.client(token) as http:
            response = http.post("/v1/search", json={"sop_instance_uid": uid})
            _error(response, 401, "UNAUTHENTICATED")
            assert response.headers["www-authenticate"].startswith("Bearer")
    with served.client("search") as http:
        _error(http.get("/v1/stats"), 403, "PERMISSION_DENIED")  # statistics are the operators'
        # a header gRPC could not carry is refused here, not an internal error
        _error(
            http.get("/v1/stats", headers={"Authorization": b"Bearer bad\xe9token"}), 401, "UNAUTHENTICATED"
        )


# --- searches -----------------------------------------------------------------------------------------

HIT_KEYS = {
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "modality",
    "modality_code",
    "frame_number",
    "distance",
    "finding",
    "source",
    "matching_instances",
    "study_date",
    "rendered",
}


def _check_hits(served: Served, answer: dict[str, Any]) -> None:
    assert set(answer) == {
        "hits",
        "model_version",
        "query_modality",
        "next_offset",
        "excluded_self",
        "searched_modalities",
    }
    distances = [hit["distance"] for hit in answer["hits"]]
    assert distances == sorted(distances)
    by_sop = {case["sop"]: case for case in served.cases.values()}
    for hit in answer["hits"]:
        assert set(hit) == HIT_KEYS
        case = by_sop[hit["sop_instance_uid"]]
        assert (hit["study_instance_uid"], hit["series_instance_uid"]) == (case["study"], case["series"])
        assert hit["rendered"] == (
            f"/studies/{case['study']}/series/{case['series']}/instances/{case['sop']}/rendered"
        )
        assert hit["study_date"] is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", hit["study_date"])
        assert hit["source"] in (None, "clinical", "library")
        assert hit["finding"] is None  # no reference library here


def test_search_by_uid(served: Served) -> None:
    case = served.cases["PAT-A-0-0.dcm"]
    with served.client() as http:
        response = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "k": 5})
        assert response.status_code == 200, response.text
        answer = response.json()
        _check_hits(served, answer)
        assert len(answer["hits"]) == 5 and answer["query_modality"] == "mri"
        # no filter: the modalities of the MRI encoder (the shipped model has its own for X-ray)
        assert "mri" in answer["searched_modalities"] and "xray" not in answer["searched_modalities"]
        # the query is not its own first hit; its study sibling is the nearest
        assert answer["excluded_self"] is True
        assert case["sop"] not in {hit["sop_instance_uid"] for hit in answer["hits"]}
        assert answer["hits"][0]["sop_instance_uid"] == served.cases["PAT-A-0-1.dcm"]["sop"]
        assert answer["hits"][0]["modality"] == "mri" and answer["hits"][0]["modality_code"] == "MR"
        assert answer["hits"][0]["study_date"] == "2023-01-10"
        # asked for, it is
        itself = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "exclude_self": False}).json()
        assert itself["hits"][0]["sop_instance_uid"] == case["sop"]
        assert itself["hits"][0]["distance"] == pytest.approx(0.0, abs=1e-4)
        # modality filter, by the vocabulary's names; another encoder's modality is refused
        mri = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "modalities": ["mri"], "k": 20})
        assert {hit["modality"] for hit in mri.json()["hits"]} == {"mri"}
        other = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "modalities": ["other"]})
        assert other.status_code == 400 and "hits" not in other.json()
        # the same patient's exams left out
        others = http.post(
            "/v1/search", json={"sop_instance_uid": case["sop"], "k": 20, "exclude_same_patient": True}
        ).json()
        patients = {c["patient"] for c in served.cases.values() if c["sop"] in _sops(others)}
        assert patients == {"PAT-B"}  # the CT ("other") is embedded by another encoder than MRI
        # paging: the next page starts where the first ended
        first = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "k": 3}).json()
        assert first["next_offset"] == 3
        second = http.post("/v1/search", json={"sop_instance_uid": case["sop"], "k": 3, "offset": 3}).json()
        assert not set(_sops(first)) & set(_sops(second))
        assert first["hits"][-1]["distance"] <= second["hits"][0]["distance"]


def _sops(answer: dict[str, Any]) -> list[str]:
    return [hit["sop_instance_uid"] for hit in answer["hits"]]


def test_search_by_uploaded_dicom_json_and_multipart(served: Served) -> None:
    path = served.files["PAT-B-1-0.dcm"]
    sop = served.cases["PAT-B-1-0.dcm"]["sop"]
    with served.client() as http:
        by_json = http.post("/v1/search", json={"dicom_base64": _b64(path.read_bytes()), "k": 4})
        assert by_json.status_code == 200, by_json.text
        by_form = http.post(
            "/v1/search",
            files={"file": ("query.dcm", path.read_bytes(), "application/dicom")},
            data={"k": "4", "modalities": "mri"},
        )
        assert by_form.status_code == 200, by_form.text
    for answer in (by_json.json(), by_form.json()):
        _check_hits(served, answer)
        assert answer["query_modality"] == "mri"
        assert answer["excluded_self"] is True  # an indexed instance sent again is left out too
        assert sop not in _sops(answer)
        assert answer["hits"][0]["sop_instance_uid"] == served.cases["PAT-B-1-1.dcm"]["sop"]
    assert _sops(by_json.json()) == _sops(by_form.json())


def test_search_by_picture_with_modality(served: Served) -> None:
    png = _png(served.files["PAT-A-1-0.dcm"])
    with served.client() as http:
        _error(
            http.post("/v1/search", json={"image_base64": _b64(png)}), 400, "INVALID_ARGUMENT"
        )  # a picture needs its modality
        by_json = http.post("/v1/search", json={"image_base64": _b64(png), "modality": "mri", "k": 3})
        by_form = http.post(
            "/v1/search", files={"file": ("q.png", png, "image/png")}, data={"modality": "mri", "k": "3"}
        )
    for response in (by_json, by_form):
        assert response.status_code == 200, response.text
        answer = response.json()
        _check_hits(served, answer)
        assert answer["query_modality"] == "mri" and len(answer["hits"]) == 3
        assert answer["excluded_self"] is False
    assert _sops(by_json.json()) == _sops(by_form.json())


def test_group_by_study(served: Served) -> None:
    case = served.cases["PAT-A-0-0.dcm"]
    with served.client() as http:
        response = http.post(
            "/v1/search", json={"sop_instance_uid": case["sop"], "group_by": "study", "k": 10}
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    _check_hits(served, answer)
    studies = [hit["study_instance_uid"] for hit in answer["hits"]]
    mri_studies = {c["study"] for c in served.cases.values() if c["patient"] != "CT"}  # MRI's encoder only
    assert len(studies) == len(set(studies)) == len(mri_studies)
    assert all(hit["matching_instances"] >= 1 for hit in answer["hits"])
    assert max(hit["matching_instances"] for hit in answer["hits"]) == 2


# --- thumbnails ---------------------------------------------------------------------------------------


def test_rendered_png_with_etag(served: Served) -> None:
    case = served.cases["PAT-A-0-0.dcm"]
    path = f"/studies/{case['study']}/series/{case['series']}/instances/{case['sop']}/rendered"
    with served.client() as http:
        response = http.get(path, params={"size": 32})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "private, max-age=3600"
        etag = response.headers["etag"]
        assert re.fullmatch(r'"[^"]+"', etag)
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG" and image.mode == "L" and max(image.size) == 32
        # not modified: no body, the same ETag
        again = http.get(path, params={"size": 32}, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        # another size is another thumbnail: another ETag
        viewport = http.get(path, params={"viewport": "48,40"})
        assert viewport.status_code == 200 and viewport.headers["etag"] != etag
        assert max(Image.open(io.BytesIO(viewport.content)).size) == 40
        assert http.get(path, headers={"If-None-Match": viewport.headers["etag"]}).status_code in (200, 304)
        assert http.get(path, headers={"Accept": "image/*"}).status_code == 200
        _error(http.get(path, headers={"Accept": "application/json"}), 406, "NOT_ACCEPTABLE")
        _error(http.get(path, params={"size": 2000}), 400, "INVALID_ARGUMENT")
        _error(http.get(path, params={"viewport": "2000,1500"}), 400, "INVALID_ARGUMENT")
        _error(http.get(path, params={"viewport": "64,64", "size": 64}), 400, "INVALID_ARGUMENT")
        _error(http.get(path, params={"viewport": "wide"}), 400, "INVALID_ARGUMENT")
        _error(http.get(path.replace(case["sop"], "1.2.826.0.1.3680043.99.1")), 404, "NOT_FOUND")
        _error(http.get(path.replace(case["study"], "not-a-uid")), 400, "INVALID_ARGUMENT")
    with served.client(None) as anonymous:
        _error(anonymous.get(path), 401, "UNAUTHENTICATED")


# --- bad input ----------------------------------------------------------------------------------------


def test_unknown_uid_is_404(served: Served) -> None:
    with served.client() as http:
        _error(http.post("/v1/search", json={"sop_instance_uid": "1.2.3.4.5.6.7"}), 404, "NOT_FOUND")


def test_an_upload_that_is_not_an_image(served: Served) -> None:
    text = b"Patient: Doe^Jane, this is not an image\n" * 10
    with served.client() as http:
        # not DICOM, PNG or JPEG by its signature: 415, and the message quotes nothing of it
        message = _error(
            http.post("/v1/search", files={"file": ("notes.txt", text, "text/plain")}),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        )
        assert "Doe" not in message
        _error(http.post("/v1/search", json={"image_base64": _b64(text), "modality": "mri"}), 415)
        _error(http.post("/v1/search", json={"dicom_base64": _b64(text)}), 415)
        # the right signature but not decodable: the query service says INVALID_ARGUMENT
        broken_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
        _error(http.post("/v1/search", json={"image_base64": _b64(broken_png), "modality": "mri"}), 400)
        broken_dicom = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI"
        _error(http.post("/v1/search", json={"dicom_base64": _b64(broken_dicom)}), 400, "INVALID_ARGUMENT")
        _error(http.post("/v1/search", json={"image_base64": "***not base64***", "modality": "mri"}), 400)
        # neither JSON nor multipart
        _error(http.post("/v1/search", content=b"k=5", headers={"Content-Type": "text/plain"}), 415)
        _error(
            http.post("/v1/search", content=b"{not json", headers={"Content-Type": "application/json"}), 400
        )
        _error(http.post("/v1/search", json=["sop_instance_uid"]), 400, "INVALID_ARGUMENT")
        # two queries, none, unknown keys and values
        uid = served.cases["PAT-A-0-0.dcm"]["sop"]
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "dicom_base64": "AAAA"}), 400)
        _error(http.post("/v1/search", json={"k": 3}), 400)
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "colour": "red"}), 400)
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "modalities": ["ct"]}), 400)
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "group_by": "patient"}), 400)
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "source": "elsewhere"}), 400)
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, "modality": "mri"}), 400)
        _error(
            http.post("/v1/search", data={"sop_instance_uid": uid, "x": "1"}, files={"file": ("a", b"")}), 400
        )


def test_uploads_over_the_size_limit_are_413(served: Served) -> None:
    big = _png(served.files["PAT-A-0-0.dcm"]) + b"\x00" * (MAX_BYTES + 1)  # a PNG signature, too large
    with served.client() as http:
        _error(
            http.post("/v1/search", files={"file": ("big.png", big, "image/png")}, data={"modality": "mri"}),
            413,
        )
        _error(http.post("/v1/search", json={"image_base64": _b64(big), "modality": "mri"}), 413)
        _error(
            http.post(
                "/v1/search",
                json={"image_base64": "A" * (api.base64_length(MAX_BYTES) + 4), "modality": "mri"},
            ),
            413,
            "PAYLOAD_TOO_LARGE",
        )
    host, port = served.base.removeprefix("http://").rsplit(":", 1)
    # a declared length over the budget is refused before any of the body is sent
    head = (
        "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 999999999\r\nAuthorization: Bearer " + served.search_token + "\r\n\r\n"
    )
    assert _raw(host, int(port), head.encode()).startswith(b"HTTP/1.1 413")
    # a body without a length is counted as it arrives, and cut at the budget
    chunk = b"A" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    head = (
        "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nAuthorization: Bearer " + served.search_token + "\r\n\r\n"
    )
    assert _raw(host, int(port), head.encode() + body).startswith(b"HTTP/1.1 413")


def test_uploads_are_read_only_for_callers_with_a_valid_token(served: Served) -> None:
    """Without a valid token a large body is refused before it is read: nobody can make the
    gateway buffer uploads (its memory) without being allowed to search."""
    host, port = served.base.removeprefix("http://").rsplit(":", 1)
    for length in ("Content-Length: 10000000", "Transfer-Encoding: chunked"):
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{length}\r\nAuthorization: Bearer not-a-valid-token-at-all\r\n\r\n"
        )
        # only the head is sent: an answer proves the gateway did not wait for the body
        assert _raw(host, int(port), head.encode()).startswith(b"HTTP/1.1 401"), length


def test_the_listening_socket_says_it_is_tcp() -> None:
    """asyncio turns Nagle off (TCP_NODELAY) only on sockets whose protocol is IPPROTO_TCP; with
    proto 0 every keep-alive response's body waited ~40 ms behind its headers."""
    from services.core.net import bind_socket

    sock = bind_socket("127.0.0.1", 0, "the HTTP gateway")
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def _raw(host: str, port: int, request: bytes) -> bytes:
    """Send raw bytes, return the start of the answer (a server may close before taking them all)."""
    with socket.create_connection((host, port), timeout=30) as sock:
        # answered and closed before the body went through: the answer is what counts
        with contextlib.suppress(OSError):
            sock.sendall(request)
        return sock.recv(65536)


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 0},
        {"k": 1001},
        {"k": -1},
        {"k": 2.5},
        {"k": "5"},
        {"offset": -1},
        {"offset": 1000},
        {"offset": 995, "k": 10},
        {"max_distance": -1.0},
    ],
    ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()),
)
def test_k_and_offset_out_of_range_are_400(served: Served, fields: dict[str, Any]) -> None:
    uid = served.cases["PAT-A-0-0.dcm"]["sop"]
    with served.client() as http:
        _error(http.post("/v1/search", json={"sop_instance_uid": uid, **fields}), 400, "INVALID_ARGUMENT")


def test_form_fields_out_of_range_are_400(served: Served) -> None:
    dicom = served.files["PAT-A-0-0.dcm"].read_bytes()
    with served.client() as http:
        for fields in ({"k": "0"}, {"k": "many"}, {"offset": "999", "k": "5"}, {"exclude_self": "perhaps"}):
            response = http.post("/v1/search", files={"file": ("q.dcm", dicom)}, data=fields)
            _error(response, 400, "INVALID_ARGUMENT")


def test_still_healthy_after_the_bad_inputs(served: Served) -> None:
    """Runs after the tests above (file order): nothing they sent hurt the service."""
    with served.client(None) as http:
        assert http.get("/healthz").json() == {"status": "serving"}
    assert "Traceback" not in served.proc.output()
    assert "Doe" not in served.proc.output()  # no request body in the logs


# --- the OpenAPI document -----------------------------------------------------------------------------


def test_committed_openapi_is_the_apps(served: Served) -> None:
    committed = (REPO / "docs" / "openapi.json").read_text()
    assert committed == render(), "docs/openapi.json drifts from the gateway: run 'make openapi' and commit"
    with served.client(None) as http:
        assert http.get("/openapi.json").json() == json.loads(committed)
        assert http.get("/docs").status_code == 404  # no Swagger UI: it would load scripts from a CDN


def test_fuzzed_requests_never_get_a_server_error(served: Served) -> None:
    """Schemathesis on the served document: per operation, 30 requests valid by the schema and 30 that
    are not (an admin token, so valid ones get past the role check); none gets a 5xx."""
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    headers = {"Authorization": f"Bearer {served.admin_token}"}
    statuses: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=30,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(mode))
            def call(case: schemathesis.Case) -> None:
                response = case.call_and_validate(
                    base_url=served.base, headers=headers, checks=[not_a_server_error]
                )
                statuses.setdefault(case.operation.label, []).append(response.status_code)

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                # an operation with no input (the health check) has no invalid request to make
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
                assert not operation.query and not operation.path_parameters and not operation.body
    assert len(statuses) == 4, statuses
    assert all(len(codes) >= 10 for label, codes in statuses.items() if label != "GET /healthz"), statuses


# --- cbmir gateway on its own ---------------------------------------------------------------------------


def _gateway(env: dict[str, str]) -> support.Proc:
    return support.Proc("gateway", [str(support.CBMIR), "gateway"], env)


def test_gateway_refuses_plain_http_off_loopback(data_dir: Path, served: Served) -> None:
    env = support.base_env(data_dir, CBMIR_HTTP_HOST="0.0.0.0", CBMIR_HTTP_PORT="0")
    refused = subprocess.run(
        [str(support.CBMIR), "gateway"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2, refused
    assert "refusing to serve plain HTTP on 0.0.0.0" in refused.stderr
    assert "CBMIR_HTTP_ALLOW_PLAINTEXT" in refused.stderr
    # behind an ingress that terminates TLS: allowed, and warned about; CORS for the viewer's origin
    gateway = _gateway(
        dict(
            env,
            CBMIR_HTTP_ALLOW_PLAINTEXT="1",
            CBMIR_QUERY_TARGET=f"127.0.0.1:{served.grpc_port}",
            CBMIR_HTTP_CORS_ORIGINS="https://viewer.example",
        )
    )
    try:
        port = int(gateway.wait_for(r"cbmir gateway: HTTP on 0\.0\.0\.0:(\d+)$", timeout_s=60).group(1))
        assert "SERVING PLAIN HTTP ON 0.0.0.0" in gateway.output()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            # from the network, a call without a token is not passed on (the query service would take
            # the gateway, on its loopback, for its operator if it had no tokens)
            message = _error(
                http.post("/v1/search", json={"sop_instance_uid": "1.2.3"}), 401, "UNAUTHENTICATED"
            )
            assert "this gateway needs an API token" in message
            admin = {"Authorization": f"Bearer {served.admin_token}"}
            assert http.get("/v1/stats", headers=admin).json()["total"] == len(served.files)
            preflight = http.options(
                "/v1/search",
                headers={
                    "Origin": "https://viewer.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"
            foreign = http.get("/healthz", headers={"Origin": "https://elsewhere.example"})
            assert "access-control-allow-origin" not in foreign.headers
    finally:
        gateway.stop()
    assert gateway.process.returncode == 0, gateway.output()


def test_gateway_serves_https(data_dir: Path, served: Served, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem, key, ca_pem = tmp_path / "gateway.pem", tmp_path / "gateway.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    env = support.base_env(
        data_dir,
        CBMIR_HTTP_HOST="0.0.0.0",  # HTTPS: a network address needs no further setting
        CBMIR_HTTP_TLS_CERT=str(pem),
        CBMIR_HTTP_TLS_KEY=str(key),
        CBMIR_QUERY_TARGET=f"127.0.0.1:{served.grpc_port}",
    )
    gateway = _gateway(env)
    try:
        port = int(gateway.wait_for(r"cbmir gateway: HTTPS on 0\.0\.0\.0:(\d+)$", timeout_s=60).group(1))
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(ca_pem)),
            timeout=30,
        ) as http:
            assert http.get("/healthz").json() == {"status": "serving"}
            stats = http.get("/v1/stats", headers={"Authorization": f"Bearer {served.admin_token}"})
            assert stats.status_code == 200 and stats.json()["total"] == len(served.files)
    finally:
        gateway.stop()


def test_gateway_without_its_query_service_is_503(data_dir: Path) -> None:
    env = support.base_env(
        data_dir, CBMIR_HTTP_PORT="0", CBMIR_QUERY_TARGET=f"127.0.0.1:{support.free_port()}"
    )
    gateway = _gateway(env)
    try:
        port = int(gateway.wait_for(r"cbmir gateway: HTTP on 127\.0\.0\.1:(\d+)$", timeout_s=60).group(1))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/healthz").status_code == 503
            response = http.post("/v1/search", json={"sop_instance_uid": "1.2.3"})
            _error(response, 503, "UNAVAILABLE")
            assert response.headers["retry-after"]
            assert http.get("/").status_code == 200  # the panel itself is served all the same
    finally:
        gateway.stop()


# --- the pieces, without processes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 503),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_one_table_from_grpc_codes_to_http(code: grpc.StatusCode, status: int) -> None:
    assert http_status(code.name) == status


def test_cbmir_errors_go_through_the_same_table() -> None:
    from services.gateway.errors import NotAcceptable, PayloadTooLarge, UnsupportedMediaType

    expected = {
        InvalidInput("x"): 400,
        TooLarge("x"): 400,  # pixels over the budget: the query service's INVALID_ARGUMENT
        PayloadTooLarge("x"): 413,
        UnsupportedMediaType("x"): 415,
        NotAcceptable("x"): 406,
        NotFound("x"): 404,
        BackendUnavailable("x"): 503,
        ConfigError("x"): 409,
        RuntimeError("x"): 500,
    }
    for error, status in expected.items():
        assert HTTP_STATUS.get(code_for(error), 500) == status, error


def test_accept_etag_and_size_rules() -> None:
    assert _accepts_png(None) and _accepts_png("image/png") and _accepts_png("text/html, */*;q=0.1")
    assert not _accepts_png("application/json") and not _accepts_png("image/png;q=0, text/html")
    assert _matches('"a", W/"b"', '"b"') and _matches("*", '"a"') and not _matches('"a"', '"b"')
    assert (
        _render_size(None, None) == 0
        and _render_size("300,200", None) == 200
        and _render_size(None, 64) == 64
    )
    for viewport, size in (("2000,2000", None), (None, 0), (None, 1025), ("0,10", None), ("1,1", 1)):
        with pytest.raises(InvalidInput):
            _render_size(viewport, size)


def test_budget_checks_base64_length_before_decoding() -> None:
    budget = api.Budget(3000)
    assert budget.max_base64 == 4000 and budget.max_body == 4000 + api.Budget.FIELDS_ROOM
    assert budget.decode(_b64(b"x" * 3000), "f") == b"x" * 3000
    with pytest.raises(TooLarge):
        budget.decode("!" * 4001, "f")  # refused by its length: never decoded (it is not base64)
    with pytest.raises(InvalidInput):
        budget.decode("!" * 4000, "f")


def test_form_fields_become_the_json_fields() -> None:
    fields = api.form_query(
        [("k", "7"), ("modalities", "mri,other"), ("modalities", "xray"), ("exclude_self", "false")]
    )
    assert fields == {"k": 7, "modalities": ["mri", "other", "xray"], "exclude_self": False}
    query = api.SearchQuery.model_validate({"sop_instance_uid": "1.2.3", **fields})
    request = api.search_request(query, api.Budget(1024))
    assert request.k == 7 and request.HasField("exclude_self") and not request.exclude_self
    for bad in ([("k", "x")], [("k", "1"), ("k", "2")], [("name", "Doe")], [("max_distance", "nan")]):
        with pytest.raises(InvalidInput):
            api.form_query(bad)


def test_serve_refuses_a_bad_http_port(data_dir: Path) -> None:
    argv = [str(support.CBMIR), "serve", "--data-dir", str(data_dir)]
    env = support.base_env(data_dir)
    flag = subprocess.run(
        [*argv, "--http-port", "70000"], env=env, capture_output=True, text=True, timeout=60
    )
    assert flag.returncode == 2 and "--http-port must be 0..65535" in flag.stderr
    variable = subprocess.run(
        argv, env=dict(env, CBMIR_HTTP_PORT="eighty"), capture_output=True, text=True, timeout=60
    )
    assert variable.returncode == 2 and "CBMIR_HTTP_PORT must be a port" in variable.stderr


def test_gateway_checks_the_query_service_by_the_name_its_certificate_carries(
    data_dir: Path, procs, tmp_path: Path
) -> None:
    """In a pod the gateway reaches the query container on 127.0.0.1, whose certificate names the
    Service: CBMIR_QUERY_SERVER_NAME is the name it checks instead (and nothing else passes)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("cbmir-query.radiology.svc")
    pem, key, ca_pem = tmp_path / "query.pem", tmp_path / "query.key", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(pem))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    query, grpc_port = support.start_query(
        support.base_env(data_dir, CBMIR_TLS_CERT=str(pem), CBMIR_TLS_KEY=str(key))
    )
    procs.append(query)
    for server_name, expected in (("cbmir-query.radiology.svc", 200), ("", 503), ("someone.else", 503)):
        env = support.base_env(
            data_dir,
            CBMIR_HTTP_PORT="0",
            CBMIR_QUERY_TARGET=f"127.0.0.1:{grpc_port}",
            CBMIR_TLS_CA=str(ca_pem),
            CBMIR_QUERY_SERVER_NAME=server_name,
        )
        gateway = _gateway(env)
        try:
            port = int(gateway.wait_for(r"cbmir gateway: HTTP on 127\.0\.0\.1:(\d+)$", timeout_s=60).group(1))
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                assert http.get("/healthz").status_code == expected, server_name
        finally:
            gateway.stop()
