"""Real corpora through the real path: WG04, pydicom's test files and pydicom-data.

Every file is C-STOREd over a real association to ``cbmir serve``. The test checks what happens
to each: refused at negotiation or with a failure status (and then kept by the listener), or
acknowledged and then indexed or quarantined with a reason. Nothing acknowledged may be lost and
no process may die. It prints the per-corpus table that the closing note quotes.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from services.dicom.scu import send_files
from services.ingest.spool import spool_name_for
from services.query.client import SearchClient
from tests import support

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _corpora(tmp: Path) -> dict[str, list[Path]]:
    import pydicom

    corpora = {
        "pydicom test files": sorted(
            p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*") if p.is_file()
        )
    }
    try:
        import data_store

        corpora["pydicom-data"] = sorted(p for p in Path(data_store.__file__).parent.rglob("*.dcm"))
    except ImportError:
        pass
    wg04 = support.SHARED_DATA / "dicom" / "wg04"
    if wg04.is_dir() and shutil.which("zstd"):
        files = []
        for path in sorted(p for p in wg04.glob("*/*") if p.is_file()):
            if path.suffix == ".zst":
                out = tmp / "wg04" / path.parent.name / path.stem
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(
                    subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
                )
                files.append(out)
            else:
                files.append(path)
        corpora["WG04"] = files
    return corpora


def _uid(path: Path) -> str | None:
    import pydicom

    try:
        return str(
            pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.MediaStorageSOPInstanceUID
        )
    except Exception:  # noqa: BLE001 - any failure means the file is skipped
        return None


def test_corpora_through_listener_and_workers(data_dir, procs, tmp_path):
    corpora = _corpora(tmp_path)
    env = support.base_env(data_dir)
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    client = SearchClient(f"127.0.0.1:{grpc_port}")

    statuses = {}
    for name, files in corpora.items():
        statuses[name] = send_files("127.0.0.1", dicom_port, files, calling_ae="CORPUS")
    support.wait_until(lambda: client.stats().pending == 0, 600, "the spool drained")
    stats = client.stats()

    quarantine = {
        json.loads(p.read_text())["name"]: json.loads(p.read_text())
        for p in (data_dir / "quarantine").glob("*.reason.json")
    }
    rows = []
    for name, results in statuses.items():
        counts = collections.Counter()
        reasons = collections.Counter()
        for path, status in results.items():
            if status == -1:
                counts["not sent (no accepted context / client refused)"] += 1
                print(f"  not sent: {name}: {path.parent.name}/{path.name}")
                continue
            counts["pushed"] += 1
            uid = _uid(path)
            spooled = spool_name_for(uid) if uid else None
            if status == 0:
                counts["acknowledged"] += 1
                if spooled and (data_dir / "archive" / spooled).exists():
                    counts["indexed"] += 1
                elif spooled and spooled in quarantine:
                    counts["quarantined"] += 1
                    reasons[quarantine[spooled]["reason"]] += 1
                else:
                    # Acknowledged twice under one UID (the corpora repeat UIDs): the later copy
                    # replaced the earlier one, idempotently. Anything else is a loss.
                    assert sum(1 for p, s in results.items() if s == 0 and _uid(p) == uid) > 1 or any(
                        s == 0 and _uid(p) == uid
                        for other in statuses.values()
                        for p, s in other.items()
                        if other is not results
                    ), f"{path} acknowledged but neither indexed nor quarantined"
                    counts["replaced by a resend of its UID"] += 1
            else:
                counts[f"refused 0x{status:04X}"] += 1
        rows.append((name, counts, reasons))
    print()
    for name, counts, reasons in rows:
        print(f"{name}: {dict(counts)}; quarantine reasons {dict(reasons)}")
    print(f"index: {stats.total} points, {stats.quarantined} quarantined")
    assert serve.process.poll() is None
    assert "exited" not in serve.output()  # no child of serve had to be restarted
    assert sum(c["indexed"] for _, c, _ in rows) > 100
