"""``cbmir reindex``: re-embed the archive into a new collection and switch the alias atomically."""

from __future__ import annotations

import subprocess

import pytest

from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration


def test_reindex_switches_alias_and_keeps_every_instance(data_dir, procs, need_dcmtk):
    files = {support.pydicom_file(n): m for n, m in list(support.E2E_FILES.items())[:3]}
    env = support.base_env(data_dir)
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    support.storescu(dicom_port, list(files))
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 120, "indexed")
    before = client.stats().collection
    client.close()

    # While the owner runs, the embedded index refuses a second process, and says why.
    busy = subprocess.run([str(support.CBMIR), "reindex"], env=env, capture_output=True, text=True)
    assert busy.returncode == 1 and "another process" in busy.stderr
    serve.stop()

    done = subprocess.run([str(support.CBMIR), "reindex"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(files)} instance(s) into" in done.stdout

    query, port = support.start_query(env)
    procs.append(query)
    client = SearchClient(f"127.0.0.1:{port}")
    stats = client.stats()
    assert stats.collection != before and stats.collection.startswith(before)
    assert stats.total == len(files)
    for path in files:
        uid = support.sop_uid(path)
        hit = client.search(sop_instance_uid=uid, k=1).hits[0]
        assert hit.sop_instance_uid == uid and hit.distance == pytest.approx(0.0, abs=1e-4)
