"""The dcmtk network side of the listener (``CBMIR_DICOM_RECEIVER=dcmtk``): its events, its
supervision, and what a crash of either process leaves (the shared behaviour is in
tests/test_listener.py and tests/test_resilience.py, run on both network sides)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from services.dicom import dcmtk_scp
from services.dicom.dcmtk_scp import ScpOptions, parse_event
from services.query.client import SearchClient
from tests import support


def test_event_lines_parse_into_events():
    stored = parse_event("stored 1.2.3.dcm 101946 812\n")
    assert stored is not None and (stored.kind, stored.name, stored.size) == ("stored", "1.2.3.dcm", 101946)
    assert stored.seconds == pytest.approx(0.000812)
    refused = parse_event("refused C210 parse-error dcmtk-1-0.part 1.2.3.dcm dataset cannot be parsed")
    assert refused is not None
    assert (refused.status, refused.reason, refused.kept, refused.name, refused.detail) == (
        0xC210,
        "parse-error",
        "dcmtk-1-0.part",
        "1.2.3.dcm",
        "dataset cannot be parsed",
    )
    # a line naming a file outside spool/tmp, or a spool name with a folder, is not an event
    assert parse_event("refused C210 parse-error /etc/passwd 1.2.3.dcm x") is None
    assert parse_event("refused C210 parse-error a.part ../1.2.3.dcm x") is None
    assert parse_event("stored ../../x.dcm 1 1") is None
    full = parse_event("refused A700 disk-full - 1.2.3.dcm the data volume is below its watermark")
    assert full is not None and full.kept is None and full.status == 0xA700
    rejected = parse_event("association rejected 10.0.0.7 calling-ae MY PACS")
    assert rejected is not None and (rejected.reason, rejected.detail, rejected.calling) == (
        "rejected",
        "calling-ae",
        "MY PACS",  # an AE title may hold a space
    )
    assert parse_event("stored 1.2.3.dcm many 1") is None
    assert parse_event("W: some dcmtk warning") is None


def test_the_contexts_come_from_the_one_vocabulary():
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from services.core.vocabulary import accepted_storage_classes

    options = ScpOptions(
        ae_title="CBMIR",
        spool_tmp=Path("/t"),
        incoming=Path("/i"),
        storage_classes=tuple(accepted_storage_classes().values()),
        transfer_syntaxes=tuple(map(str, ALL_TRANSFER_SYNTAXES)),
        max_pdu=65536,
        acse_timeout_s=30,
        idle_timeout_s=30,
        max_associations=32,
        min_free_mb=512,
        allowed_ae_titles=frozenset({"PACS2", "PACS1"}),
    )
    lines = options.contexts().splitlines()
    assert {line.split()[1] for line in lines if line.startswith("sop ")} == {
        dcmtk_scp.VERIFICATION,
        *map(str, accepted_storage_classes().values()),
    }
    argv = options.argv(Path("/bin/x"), 7)
    assert argv[argv.index("--listen-fd") + 1] == "7"
    assert [argv[i + 1] for i, word in enumerate(argv) if word == "--allow"] == ["PACS1", "PACS2"]


def test_a_missing_program_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="make dcmtk-scp"):
        dcmtk_scp.find_binary()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _native_pid(listener_pid: int) -> int:
    from tests.test_resilience import _children

    (pid,) = [pid for pid, cmd in _children(listener_pid) if dcmtk_scp.BINARY_NAME in cmd]
    return pid


@pytest.mark.integration
def test_a_killed_dcmtk_scp_is_started_again_and_what_it_stored_is_indexed(
    redis_env, procs, tmp_path, need_dcmtk
):
    """SIGKILL of the native SCP in the middle of an association: the listener starts it again on
    the same port, sends a task for everything it had made durable, and new associations work;
    nobody restarts anything by hand."""
    from tests.test_metrics import METRICS_LINE, Scrape

    env = dict(redis_env, **support.receiver_env("dcmtk"), CBMIR_METRICS_PORT="0")
    query, grpc_port = support.start_query(env)
    procs.append(query)
    scp, dicom_port = support.start_scp(env)
    procs.append(scp)
    metrics_url = scp.wait_for(METRICS_LINE).group(1)
    incoming = Path(env["CBMIR_DATA_DIR"]) / "spool" / "incoming"
    files = support.mr_series(tmp_path / "mr", 300, size=256)
    sender = subprocess.Popen(
        ["storescu", "-aec", "CBMIR", "127.0.0.1", str(dicom_port), *map(str, files)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    native = _native_pid(scp.process.pid)
    support.wait_until(lambda: len(list(incoming.iterdir())) >= 5, 30, "a few stored", interval_s=0.002)
    os.kill(native, signal.SIGKILL)
    sender.wait(timeout=30)
    durable = {path.name for path in incoming.iterdir()}
    assert 5 <= len(durable) < len(files), "the sender was cut off mid-series"
    scp.wait_for(r"cbmir-dcmtk-scp ended with exit code -9; starting it again", timeout_s=15)
    scp.wait_for(r"dcmtk SCP running again; re-sent \d+ pending instance\(s\)", timeout_s=30)
    support.storescu(dicom_port, files)  # the sender tries again: the same port serves it
    # the same metrics as the pynetdicom side: one success and one timing per instance stored
    scrape = Scrape(metrics_url)
    assert scrape.value("cbmir_dicom_receiver_restarts_total") == 1
    assert scrape.value("cbmir_dicom_associations_total", result="accepted") == 2
    stored = scrape.value("cbmir_dicom_instances_received_total", status="success")
    assert len(files) <= stored <= len(files) + len(durable)
    assert scrape.value("cbmir_dicom_store_duration_seconds_count") == stored
    assert scrape.value("cbmir_dicom_received_bytes_total") >= sum(p.stat().st_size for p in files)
    procs.append(support.start_worker(env))
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    support.wait_until(lambda: client.stats().total == len(files), 180, "every acknowledged instance indexed")
    assert client.stats().quarantined == 0
    assert durable <= {f"{support.sop_uid(path)}.dcm" for path in files}


@pytest.mark.integration
def test_the_dcmtk_scp_ends_with_its_listener_and_frees_the_port(redis_env, procs):
    """SIGKILL of the listener: its native child follows (no orphan keeps the port), and a new
    listener binds the same port."""
    env = dict(redis_env, **support.receiver_env("dcmtk"))
    scp, port = support.start_scp(env)
    procs.append(scp)
    native = _native_pid(scp.process.pid)
    os.kill(scp.process.pid, signal.SIGKILL)
    support.wait_until(lambda: not _alive(native), 10, "the native SCP gone")
    again = support.Proc("scp", [str(support.CBMIR), "scp"], dict(env, CBMIR_DICOM_PORT=str(port)))
    procs.append(again)
    again.wait_for(rf"cbmir scp: AE \S+ listening on [^:]+:{port}\b")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and again.process.poll() is None:
        time.sleep(0.2)
    assert again.process.poll() is None


def _associate_rq(calling: bytes, called: bytes = b"CBMIR") -> bytes:
    """An A-ASSOCIATE-RQ for Verification, built byte by byte (PS3.8 9.3.2), so that its calling AE
    title can hold what no toolkit would send."""
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(
        0x20,
        bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"),
    )
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)[:16]
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + context
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


@pytest.mark.integration
def test_a_calling_ae_title_with_line_breaks_or_other_bytes_forges_no_event(redis_env, procs, need_dcmtk):
    """Event lines carry the calling AE title: one with a line break and a forged event after it,
    or bytes that are not UTF-8, is printed as '?' and the listener goes on."""
    import socket

    env = dict(redis_env, **support.receiver_env("dcmtk"))
    scp, port = support.start_scp(env)
    procs.append(scp)
    for calling in (b"\rstored ../x 1 1", b"\nrefused C210 r", b"PACS\xff\xfe\x80"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(_associate_rq(calling))
            assert connection.recv(1)[:1] == b"\x02"  # A-ASSOCIATE-AC
            connection.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
            time.sleep(0.2)
    files = support.mr_series(Path(env["CBMIR_DATA_DIR"]) / "series", 2)
    support.storescu(port, files)  # still serving
    incoming = Path(env["CBMIR_DATA_DIR"]) / "spool" / "incoming"
    assert sorted(p.name for p in incoming.iterdir()) == sorted(f"{support.sop_uid(p)}.dcm" for p in files)
    output = scp.output()
    assert "unexpected line" not in output and "event failed" not in output and "Traceback" not in output
    assert not list((Path(env["CBMIR_DATA_DIR"]) / "quarantine").glob("*")), "a forged refusal was acted on"


@pytest.mark.integration
def test_silent_connections_take_no_association_slot(redis_env, procs, need_dcmtk):
    """40 connections that say nothing (more than the 32 association slots): a real sender is
    served at once, not after the 30 s ACSE timeout."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    env = dict(redis_env, **support.receiver_env("dcmtk"))
    scp, port = support.start_scp(env)
    procs.append(scp)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.5)
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", port, ae_title="CBMIR")
        assert assoc.is_established, "the silent connections held the association slots"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < 5
    finally:
        for connection in silent:
            connection.close()
