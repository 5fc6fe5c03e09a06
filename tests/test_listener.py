"""The DICOM listener's answers over real associations: success, failure statuses, allowlist.

Every listener test runs against both network sides (``CBMIR_DICOM_RECEIVER``): pynetdicom and the
native dcmtk SCP. They must answer alike."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from tests import support

pytestmark = pytest.mark.integration


@pytest.fixture(params=support.RECEIVERS)
def listener(request, data_dir, procs, redis_env):
    selected = support.receiver_env(request.param)

    def start(**extra):
        env = dict(redis_env, **selected, **extra)
        proc, port = support.start_scp(env)
        procs.append(proc)
        return proc, port

    return start


@pytest.fixture
def send_raw(monkeypatch):
    """Send a file's bytes as they are: pynetdicom reads the meta and sends the dataset unparsed.
    Its switch for that is process-wide, so it is set for this test only."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    return _send_raw


def _send_raw(port: int, path: Path, calling: str = "PYNETDICOM") -> int:
    ae = AE(ae_title=calling)
    meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CBMIR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def _mr_with(tmp_path: Path, name: str, mutate) -> Path:
    ds = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    mutate(ds)
    out = tmp_path / name
    ds.save_as(out, enforce_file_format=False)
    return out


def test_echo_and_store_success(listener, need_dcmtk, data_dir):
    _, port = listener()
    echo = subprocess.run(
        ["echoscu", "-aec", "CBMIR", "127.0.0.1", str(port)], capture_output=True, text=True
    )
    assert echo.returncode == 0, echo.stderr
    path = support.pydicom_file("MR_small.dcm")
    support.storescu(port, [path])
    assert (data_dir / "spool" / "incoming" / f"{support.sop_uid(path)}.dcm").read_bytes()[128:132] == b"DICM"


def _element(group: int, element: int, vr: bytes, value: bytes, claimed: int | None = None) -> bytes:
    value += b"\0" * (len(value) % 2)
    return (
        struct.pack("<HH", group, element)
        + vr
        + struct.pack("<H", len(value) if claimed is None else claimed)
        + value
    )


def test_truncated_dataset_is_refused_with_c210_and_kept(listener, tmp_path, data_dir, send_raw):
    """Valid UIDs, then an element that claims 100 bytes and has 4: the dataset ends too early."""
    _, port = listener()
    meta = pydicom.dataset.FileMetaDataset()
    uid = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buffer = BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    body = (
        _element(0x0008, 0x0016, b"UI", str(MRImageStorage).encode())
        + _element(0x0008, 0x0018, b"UI", uid.encode())
        + _element(0x0020, 0x000D, b"UI", generate_uid().encode())
        + _element(0x0020, 0x000E, b"UI", generate_uid().encode())
        + _element(0x0010, 0x0010, b"PN", b"Doe", claimed=100)
    )
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + body)
    assert send_raw(port, broken) == 0xC210
    reasons = [json.loads(p.read_text()) for p in (data_dir / "quarantine").glob("*.reason.json")]
    assert [(r["stage"], r["name"]) for r in reasons] == [("listener", f"{uid}.dcm")]
    assert reasons[0]["reason"] in ("truncated", "parse-error")
    assert not list((data_dir / "spool" / "incoming").iterdir())


def test_pixel_data_cut_short_is_refused_with_c210_and_kept(listener, tmp_path, data_dir, send_raw):
    """A 128 KB Pixel Data value (larger than what the checks read into memory) missing its last
    kilobyte: found, refused and kept by both network sides."""
    _, port = listener()
    (whole,) = support.mr_series(tmp_path / "mr", 1, size=256)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1024])
    assert send_raw(port, cut) == 0xC210
    reasons = [json.loads(p.read_text()) for p in (data_dir / "quarantine").glob("*.reason.json")]
    assert [(r["stage"], r["name"]) for r in reasons] == [("listener", f"{support.sop_uid(whole)}.dcm")]
    assert not list((data_dir / "spool" / "incoming").iterdir())
    assert not list((data_dir / "spool" / "tmp").iterdir())


def test_dataset_disagreeing_with_request_gets_a900(listener, tmp_path, send_raw):
    _, port = listener()

    def mismatch(ds):
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request's UID

    path = _mr_with(tmp_path, "mismatch.dcm", mismatch)
    assert send_raw(port, path) == 0xA900


def _dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its File Meta Information (preamble, DICM, group 2)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]  # (0002,0000) UL: tag, VR, length, value
    return data[132 + 12 + group_length :]


def test_parallel_associations_stream_every_file_byte_for_byte(listener, need_dcmtk, tmp_path, data_dir):
    """Four storescu processes at once, each with its own MR series of 512 KiB objects: every
    spooled file holds exactly the dataset that was sent, and nothing is left in spool/tmp."""
    import numpy as np

    _, port = listener()
    rng = np.random.default_rng(4)
    template = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    del template[0xFFFCFFFC]  # Data Set Trailing Padding: storescu drops it when it sends
    senders: list[list[Path]] = []
    for sender in range(4):
        files = []
        for number in range(12):
            ds = template.copy()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Rows = ds.Columns = 512
            ds.PixelData = rng.integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
            path = tmp_path / f"s{sender}-{number:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        senders.append(files)
    env = dict(__import__("os").environ, TCP_NODELAY="1")
    pushes = [
        subprocess.Popen(
            ["storescu", "-aec", "CBMIR", "127.0.0.1", str(port), *map(str, files)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for files in senders
    ]
    outputs = [push.communicate(timeout=300)[0] for push in pushes]
    assert all(push.returncode == 0 for push in pushes), outputs
    incoming = data_dir / "spool" / "incoming"
    for path in (p for files in senders for p in files):
        spooled = incoming / f"{support.sop_uid(path)}.dcm"
        assert _dataset_bytes(spooled) == _dataset_bytes(path), path.name
    assert len(list(incoming.iterdir())) == 48
    assert not list((data_dir / "spool" / "tmp").iterdir())


def test_unwritable_spool_gets_out_of_resources(listener, need_dcmtk, data_dir):
    _, port = listener()
    tmp = data_dir / "spool" / "tmp"
    shutil.rmtree(tmp)
    tmp.write_text("not a folder")  # every durable write now fails
    result = support.storescu(port, [support.pydicom_file("MR_small.dcm")], check=False)
    # dcmtk names 0xA700 "Refused: OutOfResources"
    assert "refused: outofresources" in (result.stdout + result.stderr).lower()
    assert not list((data_dir / "spool" / "incoming").iterdir())


def test_allowlist_rejects_unknown_calling_ae(listener, need_dcmtk, data_dir):
    proc, port = listener(CBMIR_ALLOWED_AE_TITLES="PACS1, PACS2")
    path = support.pydicom_file("MR_small.dcm")
    refused = support.storescu(port, [path], calling_aet="INTRUDER", check=False)
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()
    assert not list((data_dir / "spool" / "incoming").iterdir())
    support.storescu(port, [path], calling_aet="PACS2")
    assert len(list((data_dir / "spool" / "incoming").iterdir())) == 1
    assert "allow all" not in proc.output()


def test_empty_allowlist_warns_at_start(listener):
    proc, _ = listener()
    assert "CBMIR_ALLOWED_AE_TITLES is empty" in proc.output()


def test_non_image_sop_class_is_rejected_at_negotiation(listener):
    _, port = listener()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CBMIR")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    assoc.release()
    assert "1.2.840.10008.5.1.4.1.1.88.11" in rejected
    assert str(MRImageStorage) in accepted


def test_every_clinical_storage_class_is_offered():
    from services.core.vocabulary import accepted_storage_classes

    uids = set(map(str, accepted_storage_classes().values()))
    for uid in (
        "1.2.840.10008.5.1.4.1.1.1",  # CR
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography
        "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # OCT B-scan Volume Analysis
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.9.7.1",  # Routine Scalp EEG
    ):
        assert uid in uids, uid
    assert "1.2.840.10008.5.1.4.1.1.88.11" not in uids  # Basic Text SR


def test_dx_for_processing_is_accepted_over_a_real_association(listener):
    _, port = listener()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CBMIR")
    assert assoc.is_established and len(assoc.accepted_contexts) == 1
    assoc.release()
