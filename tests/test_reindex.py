"""``cbmir reindex``: re-embed the archive into a new collection and switch the alias atomically."""

from __future__ import annotations

import subprocess

import grpc
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
        hit = client.search(sop_instance_uid=uid, k=1, exclude_self=False).hits[0]
        assert hit.sop_instance_uid == uid and hit.distance == pytest.approx(0.0, abs=1e-4)


def test_online_reindex_keeps_answering_and_misses_nothing_pushed_meanwhile(
    data_dir, procs, tmp_path, need_dcmtk
):
    """The index owner rebuilds while searches run without pause and new objects arrive: no search
    fails or sees a partial index, and everything pushed during the build is in the new collection."""
    import json
    import secrets
    import threading
    import time

    admin = secrets.token_hex(16)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{admin} admin\n")
    env = support.base_env(data_dir, CBMIR_API_TOKENS_FILE=str(tokens))
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    first = support.mr_series(tmp_path / "first", 240, size=128, seed=1)
    later = support.mr_series(tmp_path / "later", 40, size=128, seed=2)
    support.storescu(dicom_port, first)
    client = SearchClient(f"127.0.0.1:{grpc_port}", token=admin)
    support.wait_until(lambda: client.stats().total == len(first), 180, "the first objects indexed")
    before = client.stats().collection
    probe = support.sop_uid(first[0])

    problems: list[str] = []
    searches = [0]
    stop = threading.Event()

    def search_all_the_time() -> None:
        while not stop.is_set():
            try:
                hits = client.search(sop_instance_uid=probe, k=10, exclude_self=False).hits
                total = client.stats().total
                if len(hits) != 10 or hits[0].sop_instance_uid != probe or total < len(first):
                    problems.append(
                        f"{len(hits)} hits, first {hits[0].sop_instance_uid if hits else None}, total {total}"
                    )
                searches[0] += 1
            except grpc.RpcError as exc:
                problems.append(f"{exc.code().name}: {exc.details()}")
            time.sleep(0.01)

    searcher = threading.Thread(target=search_all_the_time)
    searcher.start()
    reindex = subprocess.Popen(
        [str(support.CBMIR), "reindex", "--server", f"127.0.0.1:{grpc_port}", "--token", admin],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state_file = data_dir / "reindex" / "state.json"
    support.wait_until(state_file.exists, 60, "the reindex started")  # push while it builds
    pushed_during = []
    for chunk in (later[:10], later[10:20], later[20:30], later[30:]):
        support.storescu(dicom_port, chunk)
        status = json.loads(state_file.read_text())["state"]
        pushed_during.append(status == "building")
    out, err = reindex.communicate(timeout=300)
    assert reindex.returncode == 0, err
    support.wait_until(lambda: client.stats().total == len(first) + len(later), 120, "everything indexed")
    time.sleep(0.5)
    stop.set()
    searcher.join()
    assert not problems, problems[:5]
    assert searches[0] > 20
    assert any(pushed_during), "no object arrived while the reindex was building (the test proves nothing)"
    stats = client.stats()
    assert stats.collection != before and stats.collection.startswith(before.split("--")[0])
    assert f"into {stats.collection}" in out
    for path in later:  # in the new collection, which the alias now names
        assert client.search(sop_instance_uid=support.sop_uid(path), k=1, exclude_self=False).hits[
            0
        ].distance == pytest.approx(0, abs=1e-4)
    verify = subprocess.run(
        [str(support.CBMIR), "verify", "--server", f"127.0.0.1:{grpc_port}", "--token", admin],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the replaced collection is kept (to switch back) until --drop-old, or its grace period, ends it
    shards = data_dir / "index" / "shards"
    assert (shards / f"{before}.json").exists()
    again = subprocess.run(
        [str(support.CBMIR), "reindex", "--drop-old", "--server", f"127.0.0.1:{grpc_port}", "--token", admin],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    remaining = sorted(p.stem for p in shards.glob("*.json"))
    assert remaining == [client.stats().collection], remaining
    assert client.stats().total == len(first) + len(later)
    client.close()
