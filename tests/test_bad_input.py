"""Bad input end to end: the malformed corpus through the real listener and the real watcher.

At the listener each file goes over its own real association, sent by pynetdicom as raw file
bytes (``STORE_SEND_CHUNKED_DATASET``: nothing is re-encoded or repaired on the way). A file the
SCU cannot frame as a C-STORE (no File Meta, no UIDs) is the client refusing; a client that
parses leniently (``dcmread(force=True)``) gets one more try with the parsed dataset. Then:

* SOP classes we do not index (SR, RT Plan) are rejected at negotiation;
* an object the listener accepts (0x0000) but the worker cannot decode ends in quarantine with the
  corpus' expected reason; one the listener refuses (0xA900/0xC210) is kept in quarantine by the
  listener;
* every object answered with success is in the archive or the quarantine afterwards.

At the watcher the same corpus (generated again, so UIDs differ) is dropped into the folder: each
file ends in quarantine with its reason, by the watcher itself or by the worker. ``GetIndexStats``
must count every quarantine entry, and no process may die.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from services.core.vocabulary import accepted_storage_classes
from tests.support import CBMIR, Proc, base_env, start_query, start_scp, start_worker, wait_until

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parent / "corpus" / "malformed.py"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
# The watcher takes a *.png as a picture, so the PNG signature case is "not a picture" there.
WATCHER_REASON_OVERRIDES = {"not_dicom.png": "not-an-image"}


def load_corpus_module():
    spec = importlib.util.spec_from_file_location("cbmir_malformed_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mr(meta_uid: str | None = None, dataset_uid: str | None = "new", sop_class: str = MR_IMAGE) -> bytes:
    """A small valid MR object, optionally with File Meta that disagrees with the dataset."""
    import io

    import numpy as np

    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = meta_uid or uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SOPClassUID = sop_class
    if dataset_uid is not None:
        ds.SOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(256, dtype=np.uint8).tobytes()
    ds.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def listener_only_cases(out: Path) -> list[dict]:
    """Requests the corpus cannot express: dataset and C-STORE request disagree."""
    cases = [
        (
            "instance_uid_mismatch.dcm",
            _mr(meta_uid=generate_uid()),
            0xA900,
            "dataset-mismatch",
            "File Meta (so the request) names another SOP Instance UID than the dataset",
        ),
        (
            "class_mismatch.dcm",
            _mr(sop_class=CT_IMAGE),
            0xA900,
            "dataset-mismatch",
            "request says MR Image Storage, the dataset says CT Image Storage",
        ),
        (
            "dataset_without_uid.dcm",
            _mr(dataset_uid=None),
            0xC210,
            "missing-uid",
            "the dataset has no SOP Instance UID (the File Meta has one)",
        ),
    ]
    for name, data, *_ in cases:
        (out / name).write_bytes(data)
    return [
        {"file": name, "expected_status": status, "expected_reason": reason, "description": text}
        for name, _, status, reason, text in cases
    ]


# --- a real SCU ----------------------------------------------------------------------------------


def _meta(path: Path) -> tuple[str, str, str]:
    """(SOP class, SOP instance, transfer syntax) from the File Meta, '' where unreadable."""
    try:
        meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    except Exception:  # noqa: BLE001 - the client side may fail in any way on a broken file
        return "", "", ""
    return (
        str(meta.get("MediaStorageSOPClassUID", "") or ""),
        str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
        str(meta.get("TransferSyntaxUID", "") or ""),
    )


def _associate(port: int, sop_class: str, transfer_syntax: str):
    from pynetdicom import AE

    ae = AE(ae_title="BADSCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = 5  # one case gets no answer at all (see below): do not wait long for it
    ae.add_requested_context(VERIFICATION)  # so the association stands even if the rest is rejected
    ae.add_requested_context(sop_class, [transfer_syntax])
    return ae.associate("127.0.0.1", port, ae_title="CBMIR")


def send(port: int, path: Path) -> dict:
    """Send one file over its own association; returns what happened and the request's UID.
    Raw file bytes, as stored: the caller turns on pynetdicom's chunked send (see the test)."""
    sop_class, sop_instance, syntax = _meta(path)
    payload: Path | Dataset = path
    outcome = {"uid": sop_instance, "how": "raw file bytes"}
    if not (sop_class and syntax):
        # pynetdicom cannot frame this file; a lenient client would parse it and send the dataset
        try:
            ds = dcmread(path, force=True)
            sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - the client side may fail in any way on a broken file
            return dict(outcome, result="client-refused", detail=f"{type(exc).__name__}")
        if not ds.get("file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        syntax, payload = str(ds.file_meta.TransferSyntaxUID), ds
        outcome.update(uid=sop_instance, how="dataset parsed with force=True")
    assoc = _associate(port, sop_class, syntax)
    try:
        if not assoc.is_established:
            return dict(outcome, result="association-failed")
        rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class]
        if rejected:
            return dict(outcome, result="rejected-at-negotiation", detail=f"result {rejected[0].result}")
        try:
            status = assoc.send_c_store(payload)
        except (ValueError, AttributeError) as exc:
            return dict(outcome, result="client-refused", detail=f"{type(exc).__name__}: {exc}"[:120])
        if "Status" not in status:
            return dict(
                outcome, result="no-response", detail="association aborted" if assoc.is_aborted else ""
            )
        return dict(outcome, result="status", status=int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()


# --- the test ------------------------------------------------------------------------------------


def quarantine_records(data: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data / "quarantine").glob("*.reason.json"))]


def find_record(records: list[dict], spool_name: str) -> dict | None:
    """The quarantine record of a spool name (the listener keeps refused bytes as q-<ns>-<name>)."""
    for record in records:
        if record["name"] == spool_name or record["name"].endswith("-" + spool_name):
            return record
    return None


def test_malformed_corpus_through_listener_and_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    from services.ingest.spool import spool_name_for
    from services.query.client import SearchClient

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send() sends raw file bytes
    corpus = load_corpus_module()
    to_listener, to_watcher = tmp_path / "corpus-listener", tmp_path / "corpus-watcher"
    index = json.loads(corpus.generate(to_listener).read_text())
    corpus.generate(to_watcher, index["limits"])
    limits = index["limits"]
    extra = listener_only_cases(to_listener)

    data, watch = tmp_path / "data", tmp_path / "in"
    env = base_env(
        data,
        CBMIR_MAX_ROWS=str(limits["max_rows"]),
        CBMIR_MAX_COLUMNS=str(limits["max_columns"]),
        CBMIR_MAX_FRAMES=str(limits["max_frames"]),
        CBMIR_MAX_RETRIES="1",
        CBMIR_RETRY_BACKOFF_S="0.5",
    )
    procs: list[Proc] = []
    try:
        query, grpc_port = start_query(env)
        procs.append(query)
        scp, dicom_port = start_scp(env)
        procs.append(scp)
        procs.append(start_worker(env, grpc_port))
        watcher = Proc("watch", [str(CBMIR), "watch", str(watch)], env)
        procs.append(watcher)
        watcher.wait_for(r"cbmir watch: watching ")

        # the watcher's share: drop every file at once
        watch.mkdir(exist_ok=True)
        for case in index["cases"]:
            (watch / case["file"]).write_bytes((to_watcher / case["file"]).read_bytes())

        # the listener's share: one association per file
        accepted = {str(uid) for uid in accepted_storage_classes().values()}
        results = {}
        for case in index["cases"] + extra:
            path = to_listener / case["file"]
            results[case["file"]] = dict(send(dicom_port, path), case=case, sop_class=_meta(path)[0])

        acknowledged = {name: r for name, r in results.items() if r.get("status") == 0x0000}
        wait_until(
            lambda: (
                not any((data / "spool" / "incoming").iterdir())
                and all(
                    (data / "archive" / spool_name_for(r["uid"])).exists()
                    or (data / "quarantine" / spool_name_for(r["uid"])).exists()
                    for r in acknowledged.values()
                )
            ),
            90,
            "every acknowledged object archived or quarantined",
        )
        wait_until(lambda: not any(p.is_file() for p in watch.iterdir()), 60, "the watcher took every file")
        wait_until(lambda: not any((data / "spool" / "incoming").iterdir()), 60, "the spool drained")

        records = quarantine_records(data)
        by_name = {r["name"]: r for r in records}
        client = SearchClient(f"127.0.0.1:{grpc_port}")
        stats = client.stats()
        client.close()

        # -- the listener -------------------------------------------------------------------------
        table = []
        for name, r in results.items():
            case, result = r["case"], r["result"]
            expected = case["expected_reason"]
            final = "-"
            if result == "rejected-at-negotiation":
                assert r["sop_class"] and r["sop_class"] not in accepted, name
            elif result == "client-refused":
                assert expected in ("empty", "not-dicom", "missing-uid"), (name, r)
            elif result == "no-response":
                # pynetdicom's SCP drops a C-STORE-RQ without an Affected SOP Instance UID unanswered
                assert not r["uid"] and expected == "missing-uid", (name, r)
            else:
                assert result == "status", (name, r)
                record = find_record(records, spool_name_for(r["uid"]))
                if r["status"] == 0x0000:
                    if record is None:  # indexed: only a valid object may be
                        assert (data / "archive" / spool_name_for(r["uid"])).exists(), name
                        assert r["how"] != "raw file bytes", f"{name} was indexed as sent: {case}"
                        final = "indexed"
                    else:
                        assert record["stage"] == "worker" and record["reason"] == expected, (name, record)
                        final = f"quarantined: {record['reason']}"
                else:
                    assert r["status"] == case.get("expected_status", r["status"]), (name, hex(r["status"]))
                    assert r["status"] in (0xA700, 0xA900, 0xC210, 0x0110), (name, hex(r["status"]))
                    assert record is not None and record["stage"] == "listener", (name, records)
                    assert record["reason"] == expected, (name, record)
                    final = f"kept by the listener: {record['reason']}"
            shown = f"0x{r['status']:04X}" if result == "status" else result
            table.append(f"{name:32} {shown:24} {final:40} {r.get('how', '')} {r.get('detail', '')}")
        for case in extra:
            assert results[case["file"]].get("status") == case["expected_status"], results[case["file"]]

        # -- the watcher --------------------------------------------------------------------------
        for case in index["cases"]:
            name = case["file"]
            expected = WATCHER_REASON_OVERRIDES.get(name, case["expected_reason"])
            uid = _meta(to_watcher / name)[1] or ""
            by_worker = find_record(records, spool_name_for(uid)) if uid else None
            record = by_name.get(name) or by_worker
            assert record is not None, (name, sorted(by_name))
            assert record["reason"] == expected, (name, record)
            moved_to = ".failed" if record["stage"] == "watcher" else ".processed"
            assert (watch / moved_to / name).exists(), (name, moved_to)
            table.append(f"watch/{name:26} {record['stage']:24} quarantined: {record['reason']}")

        # -- counts, liveness ---------------------------------------------------------------------
        assert stats.quarantined == len(records)
        assert {q.reason: q.count for q in stats.quarantine_reasons} == dict(
            Counter(r["reason"] for r in records)
        )
        assert stats.pending == 0
        indexed = [p for p in (data / "archive").iterdir() if p.is_file()]
        assert stats.total == len(indexed)
        pushed = len(results)
        sent = sum(1 for r in results.values() if r["result"] == "status")
        print("\n".join(table))
        print(
            f"listener: pushed {pushed}, C-STORE sent {sent}, acknowledged {len(acknowledged)}, "
            f"indexed {stats.total}; quarantined in all {stats.quarantined}: "
            f"{ {q.reason: q.count for q in stats.quarantine_reasons} }"
        )
        time.sleep(0.5)
        for proc in procs:
            assert proc.process.poll() is None, f"{proc.name} died:\n{proc.output()}"
    finally:
        for proc in reversed(procs):
            proc.stop()
