"""A real PACS as the sender: Debian's Orthanc pushes CR, MR, OCT and EEG objects to the listener.

Orthanc runs on loopback with its own configuration in a temporary folder (non-default HTTP and
DICOM ports, no remote access, storage in the folder, ``TCP_NODELAY=1``: Debian's Orthanc sends
with Nagle otherwise). Objects are built by :mod:`services.dicom.dicomize` from the shared data,
uploaded over REST and sent with ``POST /modalities/cbmir/store``; each must be indexed and found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.core.processes import stop_process
from tests.support import SHARED_DATA, base_env, free_port, start_query, start_scp, start_worker, wait_until

pytestmark = pytest.mark.integration

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
PER_MODALITY = 2


class Orthanc:
    """One Orthanc process with its own configuration, storage and log under ``root``."""

    def __init__(self, root: Path, cbmir_port: int):
        self.http_port, self.dicom_port = free_port(), free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cbmir-test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "Plugins": [],
            "DicomModalities": {"cbmir": ["CBMIR", "127.0.0.1", cbmir_port]},
            "DicomScuTimeout": 60,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "LogExportedResources": False,
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = root / "orthanc.log"
        env = dict(os.environ, TCP_NODELAY="1")
        self._log_handle = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [ORTHANC, "--no-jobs", str(self.config)],
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._up, 60, "Orthanc's REST API", interval_s=0.3)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"Orthanc exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}"
            )
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout_s: float = 120.0,
    ):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers={"Content-Type": content_type} if body is not None else {},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str):
        return self._request("GET", path, timeout_s=5)

    def upload(self, path: Path) -> str:
        answer = self._request("POST", "/instances", path.read_bytes(), "application/dicom")
        assert answer["Status"] in ("Success", "AlreadyStored"), answer
        return answer["ID"]

    def store_to_cbmir(self, instance_ids: list[str]) -> dict:
        """Synchronous C-STORE of the instances to the ``cbmir`` modality."""
        return self._request("POST", "/modalities/cbmir/store", json.dumps(instance_ids).encode())

    def stop(self) -> None:
        stop_process(self.process, timeout_s=20)
        self._log_handle.close()


def build_objects(out: Path) -> list[tuple[Path, str, str]]:
    """(file, modality, SOP Instance UID): PER_MODALITY test-split rows of each modality."""
    from services.dicom import dicomize
    from services.dicom.build import write_dataset

    rows = dicomize.select_rows(dicomize.read_manifest(SHARED_DATA), splits=["test"])
    chosen, taken = [], {}
    for row in rows:
        if taken.get(row["modality"], 0) < PER_MODALITY:
            taken[row["modality"]] = taken.get(row["modality"], 0) + 1
            chosen.append(row)
    uids = dicomize.UidFactory(seed="orthanc-test")
    objects = []
    for number, row in enumerate(chosen, 1):
        ds = dicomize.build_dataset(row, SHARED_DATA, uids=uids, instance_number=number)
        path = write_dataset(ds, out / f"{row['modality']}-{number}.dcm")
        objects.append((path, row["modality"], str(ds.SOPInstanceUID)))
    # one more in Deflated Explicit VR Little Endian: Orthanc 1.10.1 aborts a whole batch if it
    # would have to transcode from deflate, so this also checks that the listener accepts deflate
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(objects[0][0])
    ds.PixelData = ds.pixel_array[:, ::-1].tobytes()  # mirrored: its own picture, not a tie
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.uid("deflated", objects[0][2])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = write_dataset(ds, out / "deflated.dcm")
    objects.append((path, objects[0][1], str(ds.SOPInstanceUID)))
    return objects


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")
@pytest.mark.skipif(not (SHARED_DATA / "manifest.csv").exists(), reason="shared data absent")
def test_orthanc_pushes_every_modality_and_each_is_found(tmp_path: Path) -> None:
    from services.query.client import SearchClient

    objects = build_objects(tmp_path / "objects")
    assert {modality for _, modality, _ in objects} == {"xray", "mri", "oct", "eeg"}

    env = base_env(tmp_path / "data")
    started = []
    try:
        query, grpc_port = start_query(env)
        started.append(query)
        scp, dicom_port = start_scp(env)
        started.append(scp)
        started.append(start_worker(env, grpc_port))
        pacs = Orthanc(tmp_path / "orthanc", dicom_port)
        try:
            ids = [pacs.upload(path) for path, _, _ in objects]
            assert len(set(ids)) == len(objects)
            t0 = time.monotonic()
            answer = pacs.store_to_cbmir(ids)
            sent_s = time.monotonic() - t0
            print(f"Orthanc sent {len(ids)} instances in {sent_s:.2f}s: {answer}")
            assert answer.get("FailedInstancesCount", 0) == 0, answer
            assert answer.get("InstancesCount") == len(ids), answer
        except Exception:
            print(pacs.log.read_text()[-4000:])
            raise
        finally:
            pacs.stop()

        archive = tmp_path / "data" / "archive"
        wait_until(
            lambda: len([p for p in archive.iterdir() if p.is_file()]) == len(objects),
            120,
            f"{len(objects)} objects archived",
        )
        from services.dicom.decode import read_header

        arrived = {read_header(p).transfer_syntax_uid for p in archive.iterdir()}
        print(f"transfer syntaxes as received from Orthanc: {sorted(arrived)}")
        client = SearchClient(f"127.0.0.1:{grpc_port}")
        try:
            stats = client.stats()
            assert stats.total == len(objects) and stats.quarantined == 0 and stats.pending == 0
            counts = {m.modality: m.count for m in stats.per_modality}
            assert sum(counts.values()) == len(objects) and len(counts) == 4, counts
            for path, modality, uid in objects:
                assert (archive / f"{uid}.dcm").exists(), uid
                by_uid = client.search(sop_instance_uid=uid, k=3, exclude_self=False).hits
                assert by_uid[0].sop_instance_uid == uid and by_uid[0].distance < 1e-4, (modality, by_uid)
                by_bytes = client.search(dicom=path.read_bytes(), k=3, exclude_self=False).hits
                assert by_bytes[0].sop_instance_uid == uid and by_bytes[0].distance < 1e-4, (
                    modality,
                    by_bytes,
                )
        finally:
            client.close()
        assert "refused" not in scp.output()
        for proc in started:
            assert proc.process.poll() is None, f"{proc.name} died:\n{proc.output()}"
    finally:
        for proc in reversed(started):
            proc.stop()
