"""Operating the index for years: erasure, verification and quarantine management, through the
running index owner (``--server`` with an admin token) and on the data folder when nothing serves.
Real ``cbmir serve``, real associations (dcmtk), the installed ``cbmir`` command."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration

SECRET = "site-secret-for-patient-keys-0123"


def _study(folder: Path, count: int, patient_id: str, seed: int, corrupt: bool = False) -> list[Path]:
    """``count`` MR objects of one new study of ``patient_id``."""
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    del template[0xFFFCFFFC]
    study = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(count):
        ds = template.copy()
        ds.PatientID, ds.PatientName = patient_id, f"Doe^{patient_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = 64
        ds.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
        if corrupt:
            ds.PixelData = ds.PixelData[:1000]  # far shorter than 64 x 64 x 2 bytes
        path = folder / f"{patient_id}-{number:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _cbmir(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(support.CBMIR), *args], env=env, input=stdin, capture_output=True, text=True, timeout=300
    )


def _json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _uid(path: Path) -> str:
    return support.sop_uid(path)


def test_erasure_verification_and_quarantine_through_the_running_service(
    data_dir, procs, tmp_path, need_dcmtk
):
    admin, search = secrets.token_hex(16), secrets.token_hex(16)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{search}\n{admin} admin\n")
    env = support.base_env(
        data_dir, CBMIR_API_TOKENS_FILE=str(tokens), CBMIR_PATIENT_KEY_SECRET=SECRET, CBMIR_RESEND_AFTER_S="5"
    )
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    server = ["--server", f"127.0.0.1:{grpc_port}", "--token", admin]
    client = SearchClient(f"127.0.0.1:{grpc_port}", token=admin)

    # with the index owner running, the data folder is not opened beside it
    refused = _cbmir(env, "verify", "--data-dir", str(data_dir))
    assert refused.returncode == 2 and "--server" in refused.stderr

    study_a = _study(tmp_path / "a", 4, "PAT-AAA", seed=1)
    study_b = _study(tmp_path / "b", 3, "PAT-BBB", seed=2)
    broken = _study(tmp_path / "c", 1, "PAT-CCC", seed=3, corrupt=True)
    support.storescu(dicom_port, study_a + study_b + broken)
    support.wait_until(
        lambda: (client.stats().total, client.stats().quarantined) == (7, 1), 120, "7 indexed, 1 quarantined"
    )

    # erasure needs the admin role
    denied = _cbmir(
        env, "delete", "--study", pydicom.dcmread(study_a[0]).StudyInstanceUID, *server[:2], "--token", search
    )
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr

    # a study: its points and archived objects go, in one audited, idempotent step
    study_uid = pydicom.dcmread(study_a[0]).StudyInstanceUID
    report = _json(_cbmir(env, "delete", "--study", study_uid, *server))
    assert (report["points_deleted"], report["archived_deleted"]) == (4, 4)
    assert sorted(report["sop_instance_uids"]) == sorted(_uid(p) for p in study_a)
    for path in study_a:
        assert not (data_dir / "archive" / f"{_uid(path)}.dcm").exists()
        with pytest.raises(grpc.RpcError) as gone:
            client.search(sop_instance_uid=_uid(path))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    again = _json(_cbmir(env, "delete", "--study", study_uid, *server))
    assert (again["points_deleted"], again["archived_deleted"], again["sop_instance_uids"]) == (0, 0, [])
    assert client.stats().total == 3

    # a patient, by the keyed reference of the Patient ID (read from stdin, never an argument)
    key = _cbmir(env, "patient-key", stdin="PAT-BBB\n")
    assert key.returncode == 0, key.stderr
    report = _json(_cbmir(env, "delete", "--patient-key", key.stdout.strip(), *server))
    assert (report["points_deleted"], report["archived_deleted"]) == (3, 3)
    assert client.stats().total == 0

    # quarantine: list, show without patient data, requeue (it fails again), purge by age only
    listed = _cbmir(env, "quarantine", "list", *server)
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["name"] == f"{_uid(broken[0])}.dcm" and entry["stage"] == "worker"
    assert _cbmir(env, "quarantine", "list", "--reason", "no-such-reason", *server).stdout == ""
    shown = _cbmir(env, "quarantine", "show", entry["name"], *server)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["header"]["sop_instance_uid"] == _uid(broken[0])
    assert "PAT-" not in shown.stdout and "Doe" not in shown.stdout
    requeued = _json(_cbmir(env, "quarantine", "requeue", *server))
    assert requeued["requeued"] == 1
    support.wait_until(
        lambda: (data_dir / "quarantine" / entry["name"]).exists() and client.stats().pending == 0,
        60,
        "the requeued object back in quarantine",
    )
    assert _cbmir(env, "quarantine", "purge", *server).returncode == 2  # --older-than is required
    assert _json(_cbmir(env, "quarantine", "purge", "--older-than", "1h", *server))["purged"] == 0
    time.sleep(1.1)
    assert _json(_cbmir(env, "quarantine", "purge", "--older-than", "1s", *server))["purged"] == 1
    assert (
        not list((data_dir / "quarantine").glob(f"{entry['name']}*.json")) and client.stats().quarantined == 0
    )

    # verify: an archived object without a point (missing), a point without an object (orphan)
    study_d = _study(tmp_path / "d", 3, "PAT-DDD", seed=4)
    support.storescu(dicom_port, study_d)
    support.wait_until(lambda: client.stats().total == 3, 60, "3 indexed")
    (data_dir / "archive" / f"{_uid(study_d[0])}.dcm").unlink()  # its point is an orphan now
    stray = _study(tmp_path / "e", 1, "PAT-EEE", seed=5)[0]
    (data_dir / "archive" / f"{_uid(stray)}.dcm").write_bytes(stray.read_bytes())  # archived, never indexed
    found = _cbmir(env, "verify", *server)
    assert found.returncode == 1
    report = json.loads(found.stdout)
    assert (report["archived"], report["points"], report["missing_count"], report["orphan_count"]) == (
        3,
        3,
        1,
        1,
    )
    assert report["missing"] == [f"{_uid(stray)}.dcm"] and report["orphans"] == [_uid(study_d[0])]
    repaired = _json(_cbmir(env, "verify", "--repair", *server))
    assert (repaired["resent"], repaired["orphans_deleted"]) == (1, 1)
    support.wait_until(
        lambda: client.stats().total == 3 and client.stats().pending == 0, 60, "the stray indexed"
    )
    clean = _cbmir(env, "verify", *server)
    assert clean.returncode == 0, clean.stdout
    client.search(sop_instance_uid=_uid(stray))

    # erasure finds what no point names: the earlier copy of a re-sent instance (sent first for the
    # wrong patient), and a quarantined object whose header is malformed
    wrong = _study(tmp_path / "wrong", 1, "PAT-WRONG", seed=6)[0]
    corrected = pydicom.dcmread(wrong)
    corrected.PatientID, corrected.PatientName = "PAT-RIGHT", "Roe^Right"
    corrected.PixelData = bytes(reversed(corrected.PixelData))
    corrected.save_as(tmp_path / "right.dcm", enforce_file_format=True)
    malformed = pydicom.dcmread(_study(tmp_path / "bad", 1, "PAT-WRONG", seed=7)[0])
    malformed.SeriesInstanceUID = "1." * 40 + "1"  # an invalid UID: quarantined
    malformed.save_as(tmp_path / "malformed.dcm", enforce_file_format=True)
    support.storescu(dicom_port, [wrong])
    support.wait_until(lambda: client.stats().total == 4, 60, "the wrong patient's copy indexed")
    support.storescu(dicom_port, [tmp_path / "right.dcm"])
    refused = support.storescu(dicom_port, [tmp_path / "malformed.dcm"], check=False)
    assert "CannotUnderstand" in refused.stdout + refused.stderr  # refused, and kept in quarantine
    support.wait_until(
        lambda: (
            list((data_dir / "archive" / ".replaced").glob(f"{_uid(wrong)}.dcm.*"))
            and client.stats().quarantined == 1
            and client.stats().pending == 0
        ),
        60,
        "the corrected copy indexed, the malformed one quarantined",
    )
    wrong_key = _cbmir(env, "patient-key", stdin="PAT-WRONG\n").stdout.strip()
    erased = _json(_cbmir(env, "delete", "--patient-key", wrong_key, *server))
    assert (erased["archived_deleted"], erased["quarantined_deleted"], erased["points_deleted"]) == (1, 1, 0)
    assert not list((data_dir / "archive" / ".replaced").iterdir())
    assert not list((data_dir / "quarantine").iterdir())
    assert client.search(sop_instance_uid=_uid(wrong), k=1, exclude_self=False).hits[
        0
    ].distance == pytest.approx(0, abs=1e-4)

    # an erased instance sent again at once is not indexed behind the erasure's back
    again = _json(_cbmir(env, "delete", "--instance", _uid(study_d[2]), *server))
    assert again["points_deleted"] == 1
    support.storescu(dicom_port, [study_d[2]])
    time.sleep(3)
    assert client.stats().total == 3 and client.stats().pending == 1
    assert "was erased while it was being indexed" in serve.output()

    # the audit trail: who, what, how many; never a Patient ID or name
    trail = (data_dir / "audit" / "admin.jsonl").read_text()
    actions = [json.loads(line)["action"] for line in trail.splitlines()]
    assert actions == [
        "delete",
        "delete",
        "delete",
        "quarantine-requeue",
        "quarantine-purge",
        "quarantine-purge",
        "verify-repair",
        "delete",
        "delete",
    ]
    assert "PAT-" not in trail and "Doe" not in trail and "Roe" not in trail and admin not in trail
    assert all(json.loads(line)["who"] not in ("", "anonymous") for line in trail.splitlines())

    # nothing serves: the same commands on the data folder
    client.close()
    serve.stop()
    procs.remove(serve)
    local = _json(_cbmir(env, "delete", "--instance", _uid(study_d[1]), "--data-dir", str(data_dir)))
    assert (local["points_deleted"], local["archived_deleted"]) == (1, 1)
    offline = _cbmir(env, "verify", "--data-dir", str(data_dir))
    assert offline.returncode == 0, offline.stdout
    assert json.loads(offline.stdout)["points"] == 2
    assert json.loads((data_dir / "audit" / "admin.jsonl").read_text().splitlines()[-1])["who"].startswith(
        "local:"
    )


def test_patient_keys_need_the_site_secret(data_dir):
    env = support.base_env(data_dir)
    result = _cbmir(env, "patient-key", stdin="PAT-1\n")
    assert result.returncode == 2 and "CBMIR_PATIENT_KEY_SECRET" in result.stderr
    env["CBMIR_PATIENT_KEY_SECRET"] = SECRET
    first = _cbmir(env, "patient-key", stdin="PAT-1\n")
    second = _cbmir(env, "patient-key", "--issuer", "HOSPITAL-B", stdin="PAT-1\n")
    assert first.returncode == second.returncode == 0
    assert len(first.stdout.strip()) == 32 and first.stdout != second.stdout
    assert "PAT-1" not in first.stdout + first.stderr
