"""PHI never leaves the image store: malformed objects with planted patient data go through the real
listener, the real watcher and the real query service, and nothing they write (logs at DEBUG,
quarantine reasons, index payloads, RPC answers) may carry the planted values.

The objects come from a small seeded fuzzer: a valid MR object whose patient module holds the
planted name, ID and birth date, then broken where pydicom's warnings and our errors look: lengths
that swallow or split the patient elements, a VR that is not one, values that fail their VR's
rules, an unknown character set, the wrong transfer syntax, truncations inside the values, and
random byte flips across the patient module.
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.grpc_gen.cbmir.v1 import search_pb2
from tests import support
from tests.test_bad_input import send

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PATIENT_NAME = "Quillfeather^Odalys"
PATIENT_ID = "ZX4417PHI"
BIRTH_DATE = "19370219"
# what must never appear: each planted value and the parts of the name on their own
PLANTED = (PATIENT_NAME, "Quillfeather", "Odalys", PATIENT_ID, BIRTH_DATE)


def _object(**overrides: str) -> Dataset:
    """A valid 32x32 MR object with the planted patient module (``overrides`` replace values)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.Modality = "MR"
    ds.ManufacturerModelName = "Synthetic"
    ds.TimeRange = [0.0, 1.0]  # FD, the element just before the patient module
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(7).integers(0, 255, (32, 32), dtype=np.uint8).tobytes()
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    ds.preamble = b"\x00" * 128
    return ds


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _element(data: bytes, group: int, element: int) -> tuple[int, int, int]:
    """(header offset, value offset, value length) of an explicit-VR short-length element."""
    at = data.index(struct.pack("<HH", group, element), 132 + 12)  # after the File Meta's start
    return at, at + 8, struct.unpack_from("<H", data, at + 6)[0]


def _set_length(data: bytes, at: int, length: int) -> bytes:
    return data[: at + 6] + struct.pack("<H", length) + data[at + 8 :]


def fuzz_phi_objects(seed: int = 20261130, flips: int = 12, cuts: int = 4) -> dict[str, bytes]:
    """Malformed objects carrying the planted PHI, by case name (each with its own UIDs)."""
    rng = random.Random(seed)
    cases: dict[str, bytes] = {}

    def fresh(**overrides: str) -> tuple[bytes, dict[str, tuple[int, int, int]]]:
        data = _encode(_object(**overrides))
        where = {
            "model": _element(data, 0x0008, 0x1090),
            "range": _element(data, 0x0008, 0x1163),
            "name": _element(data, 0x0010, 0x0010),
            "id": _element(data, 0x0010, 0x0020),
            "birth": _element(data, 0x0010, 0x0030),
        }
        return data, where

    data, at = fresh()
    cases["valid-with-phi"] = data
    data, at = fresh()  # the model name's length swallows name, ID and birth date
    cases["length-swallows-patient"] = _set_length(data, at["model"][0], at["birth"][1] + 8 - at["model"][1])
    data, at = fresh()  # a numeric element's length swallows the name: pydicom quotes the bytes
    cases["numbers-swallow-name"] = _set_length(data, at["range"][0], at["name"][1] + 20 - at["range"][1])
    data, at = fresh()
    cases["odd-name-length"] = _set_length(data, at["name"][0], at["name"][2] + 1)
    data, at = fresh()
    cases["name-length-past-end"] = _set_length(data, at["name"][0], 0xFFF0)
    data, at = fresh()
    cases["name-length-short"] = _set_length(data, at["name"][0], 7)
    data, at = fresh()
    cases["bad-vr"] = data[: at["name"][0] + 4] + b"Z@" + data[at["name"][0] + 6 :]
    data, at = fresh()
    cases["truncated-in-name"] = data[: at["name"][1] + len("Quillfeather^O")]
    data, at = fresh()
    cases["truncated-in-id"] = data[: at["id"][1] + 4]
    # values that fail their VR's rules: pydicom's validation warnings quote the value
    data, _ = fresh(PatientBirthDate=PATIENT_NAME, PatientSex=PATIENT_ID.lower(), PatientAge=BIRTH_DATE)
    cases["invalid-vr-values"] = data
    data, _ = fresh(StudyDate=PATIENT_ID, Modality=f"{PATIENT_NAME}\\x")
    cases["phi-in-decoded-elements"] = data
    data, _ = fresh(SpecificCharacterSet="ISO_IR 999", PatientName=f"{PATIENT_NAME}\xe9")
    cases["unknown-character-set"] = data
    data, _ = fresh()  # the File Meta says explicit VR, the dataset is encoded implicit
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 132 + 8)[0]
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, dcmread(io.BytesIO(data)))
    cases["implicit-labelled-explicit"] = data[:meta_end] + body.getvalue()
    # PHI in what the decoder reads and names in its errors
    data, _ = fresh(PhotometricInterpretation=PATIENT_NAME)
    cases["phi-in-photometric"] = data
    odd_syntax = _object()
    odd_syntax.file_meta.TransferSyntaxUID = PATIENT_ID
    buffer = io.BytesIO()
    odd_syntax.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    cases["phi-as-transfer-syntax"] = buffer.getvalue()
    for name, group in (
        ("eeg-phi-in-sample-interpretation", {"WaveformSampleInterpretation": PATIENT_ID}),
        ("eeg-phi-as-unit", {"unit": PATIENT_NAME}),
    ):
        eeg = support.eeg_dataset(samples=2048, sampling_hz=256, **group)
        eeg.PatientName, eeg.PatientID, eeg.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        eeg.preamble = b"\x00" * 128
        cases[name] = _encode(eeg)
    for number in range(flips):
        data, at = fresh()
        mutable = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(at["model"][0], at["birth"][1] + at["birth"][2] + 8)
            mutable[offset] ^= 1 << rng.randrange(8)
        cases[f"flip-{number:02d}"] = bytes(mutable)
    for number in range(cuts):
        data, at = fresh()
        after_surname = at["name"][1] + len("Quillfeather")
        cases[f"cut-{number:02d}"] = data[: rng.randrange(after_surname, at["birth"][1] + at["birth"][2])]
    return cases


def _leaks(text: str) -> list[str]:
    return [value for value in PLANTED if value.lower() in text.lower()]


@pytest.mark.integration
@pytest.mark.parametrize("receiver", support.RECEIVERS)
def test_planted_phi_reaches_no_log_payload_or_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, need_dcmtk, receiver: str
) -> None:
    from pynetdicom import _config

    from services.core.config import DataLayout, IndexSettings
    from services.index import open_index
    from services.query.client import SearchClient

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # raw bytes, nothing repaired
    cases = fuzz_phi_objects()
    objects = tmp_path / "objects"
    objects.mkdir()
    for name, data in cases.items():
        (objects / f"{name}.dcm").write_bytes(data)
    dropped = fuzz_phi_objects()  # the same cases with their own UIDs, for the watcher
    assert all(any(value.encode() in data for value in PLANTED) for data in cases.values())

    data_dir, watch = tmp_path / "data", tmp_path / "in"
    env = support.base_env(
        data_dir, CBMIR_LOG_LEVEL="DEBUG", CBMIR_MAX_RETRIES="1", **support.receiver_env(receiver)
    )
    procs: list[support.Proc] = []
    try:
        query, grpc_port = support.start_query(env)
        procs.append(query)
        scp, dicom_port = support.start_scp(env)
        procs.append(scp)
        procs.append(support.start_worker(env))
        watcher = support.Proc("watch", [str(support.CBMIR), "watch", str(watch)], env)
        procs.append(watcher)
        watcher.wait_for(r"cbmir watch: watching ")

        watch.mkdir(exist_ok=True)
        for name, data in dropped.items():
            (watch / f"{name}.dcm").write_bytes(data)
        # names people give files: a picture named after its patient, a broken one after the ID
        picture = io.BytesIO()
        Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(picture, "PNG")
        (watch / "xray").mkdir()
        (watch / "xray" / f"{PATIENT_NAME} {BIRTH_DATE}.png").write_bytes(picture.getvalue())
        (watch / f"{PATIENT_ID} chest.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        sent = {path.name: send(dicom_port, path) for path in sorted(objects.iterdir())}

        def waiting_in_watch() -> list[Path]:
            return [
                p
                for p in watch.rglob("*")
                if p.is_file() and not {".processed", ".failed"} & set(p.relative_to(watch).parts)
            ]

        support.wait_until(lambda: not waiting_in_watch(), 60, "the watcher took all")
        support.wait_until(
            lambda: not any((data_dir / "spool" / "incoming").iterdir()), 90, "the spool drained"
        )
        client = SearchClient(f"127.0.0.1:{grpc_port}")
        stats = client.stats()
        assert stats.total >= 1 and stats.quarantined >= 1, stats  # both paths were exercised

        # every object as a query image: the answers, and the errors' details and metadata
        answers = [str(stats)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            from services.grpc_gen.cbmir.v1 import search_pb2_grpc

            stub = search_pb2_grpc.SimilarCasesStub(channel)
            for name, data in cases.items():
                request = search_pb2.SearchSimilarRequest(dicom=data, k=20)
                try:
                    answers.append(f"{name}: {stub.SearchSimilar(request, timeout=30)}")
                except grpc.RpcError as exc:
                    answers.append(f"{name}: {exc.code()} {exc.details()} {exc.trailing_metadata()}")
        client.close()
    finally:
        for proc in reversed(procs):
            proc.stop()

    found: dict[str, list[str]] = {}
    for proc in procs:  # every line each process wrote, stdout and stderr
        for line in proc.lines:
            if leaks := _leaks(line):
                found.setdefault(f"log of {proc.name}", []).append(f"{leaks}: {line[:200]}")
    for answer in answers:
        if leaks := _leaks(answer):
            found.setdefault("RPC answers", []).append(f"{leaks}: {answer[:200]}")
    for record_path in sorted((data_dir / "quarantine").glob("*.reason.json")):
        record = json.loads(record_path.read_text())
        if record["stage"] == "watcher":  # a dropped file's own name stays with it (and only there)
            record.pop("name"), record.pop("source")
        if leaks := _leaks(json.dumps(record)):
            found.setdefault("quarantine reasons", []).append(f"{leaks}: {record_path.name}")
    settings = IndexSettings.from_env(env, DataLayout(data_dir))
    index = open_index(settings)
    try:
        payloads = [index.find_sop(path.stem)[1] for path in sorted((data_dir / "archive").glob("*.dcm"))]
    finally:
        index.close()
    assert payloads, "nothing was indexed: the payload check would be empty"
    for payload in payloads:
        if leaks := _leaks(json.dumps(payload)):
            found.setdefault("index payloads", []).append(f"{leaks}: {payload}")
    print(f"{len(cases)} fuzzed objects x (listener, watcher, query); {len(payloads)} indexed;")
    print({name: outcome.get("status", outcome["result"]) for name, outcome in sent.items()})
    assert not found, json.dumps(found, indent=1)


MASK_SCRIPT = """
import io, logging, sys
from pydicom import config, dcmread
from pydicom.errors import BytesLengthException
from pydicom.valuerep import validate_value
from services.core.errors import UnreadableInput
from services.core.logs import configure_logging
from tests.test_phi import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, fuzz_phi_objects

configure_logging("DEBUG")  # what every cbmir process does first
swallowed = fuzz_phi_objects()["numbers-swallow-name"]
try:
    dcmread(io.BytesIO(swallowed)).TimeRange
except BytesLengthException as exc:  # its message quotes the swallowed bytes
    assert PATIENT_NAME in str(exc)
    logging.getLogger("services.test").warning("cannot read: %s", exc, exc_info=exc)
config.convert_wrong_length_to_UN = True  # now pydicom warns instead
dcmread(io.BytesIO(swallowed)).TimeRange
validate_value("DA", PATIENT_NAME, config.WARN)
validate_value("LO", PATIENT_ID + chr(92) + BIRTH_DATE + chr(1), config.WARN)
validate_value("PN", PATIENT_NAME * 10, config.WARN)
logging.getLogger("some.library").warning("received %r and %s", PATIENT_NAME.encode(), repr(PATIENT_ID))
try:
    raise UnreadableInput(f"bad value {PATIENT_NAME!r} in {BIRTH_DATE!r}")
except UnreadableInput as exc:
    logging.getLogger("services.test").exception("decode failed: %s", exc)
"""


def test_the_mask_covers_what_pydicom_and_other_libraries_say() -> None:
    """In a process set up as every cbmir process is: pydicom's own warnings (its logger and
    Python warnings), another library's bytes, and our own exceptions with values in them reach
    the log without any of the planted values."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", MASK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "'…'" in log and "py.warnings" in log and "pydicom" in log and "Traceback" in log, log
    assert not _leaks(log), log
