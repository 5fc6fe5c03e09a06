"""The installed ``cbmir`` command itself: every subcommand's help, its flags, and the admin commands.

These run the console script the package installs (``.venv/bin/cbmir``), not ``python -m``.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.ops.cli import COMMANDS
from tests import support

pytestmark = pytest.mark.integration


def cbmir(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(support.CBMIR), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_console_script_is_installed() -> None:
    assert support.CBMIR.is_file(), f"{support.CBMIR} is missing: install the package (pip install -e .)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str) -> None:
    result = cbmir(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: cbmir {command}"), result.stdout[:200]


def test_top_level_help_lists_every_command() -> None:
    result = cbmir("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^    {re.escape(command)}(\s|$)", result.stdout, re.MULTILINE), command


def test_python_dash_m_services_is_the_same_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services", "reindex", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "--requeue-quarantined" in result.stdout


def test_usage_errors_exit_2_with_a_message() -> None:
    assert cbmir().returncode == 2
    bogus = cbmir("scp", "--bogus")
    assert bogus.returncode == 2 and "unrecognized arguments: --bogus" in bogus.stderr
    missing = cbmir("search", "--uid", "1.2.3")
    assert missing.returncode == 2 and "--server" in missing.stderr
    both = cbmir("reindex", "--pending", "--requeue-quarantined")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_wrong_setting_is_one_line_and_exit_2(data_dir: Path) -> None:
    for command, variable, value in (
        ("query", "CBMIR_DEVICE", "gpu"),
        ("scp", "CBMIR_DICOM_PORT", "eleven"),
        ("stats", "CBMIR_LOG_LEVEL", "LOUD"),
    ):
        args = ("--server", "127.0.0.1:1") if command == "stats" else ()
        result = cbmir(command, *args, env=support.base_env(data_dir, **{variable: value}))
        assert result.returncode == 2, (command, result.stderr)
        assert variable in result.stderr and "Traceback" not in result.stderr


def test_serve_leaves_no_child_behind_when_a_part_fails_to_start(data_dir: Path) -> None:
    """The listener cannot bind (the port is taken): serve exits 1, and the query service it had
    already started is gone too, so the gRPC port and the embedded index are free again."""
    import socket

    from services.index import EdgeIndex

    grpc_port = support.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cbmir(
            "serve",
            "--data-dir",
            str(data_dir),
            "--dicom-port",
            str(taken.getsockname()[1]),
            "--grpc-port",
            str(grpc_port),
            env=support.base_env(data_dir),
            timeout=240,
        )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "failed to start" in result.stderr and "scp" in result.stderr
    EdgeIndex(data_dir / "index", "probe").close()  # BackendUnavailable if a query process still owns it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", grpc_port))


def test_client_commands_report_an_unreachable_service(data_dir: Path) -> None:
    port = support.free_port()
    result = cbmir("stats", "--server", f"127.0.0.1:{port}", env=support.base_env(data_dir))
    assert result.returncode == 2 and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def _queued_tasks(queue: str) -> list[list[str]]:
    """The spool names of each ``cbmir.embed_instances`` message waiting in a Redis queue (kombu
    keeps a list per queue)."""
    import redis

    client = redis.Redis.from_url(support.REDIS_URL)
    names = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "cbmir.embed_instances"
        names.append(json.loads(base64.b64decode(message["body"]))[0][0])
    client.delete(queue)
    return names


def test_reindex_pending_resends_every_spooled_instance(redis_env: dict[str, str], data_dir: Path) -> None:
    incoming = data_dir / "spool" / "incoming"
    incoming.mkdir(parents=True)
    for name in ("1.2.3.1.dcm", "1.2.3.2.dcm"):
        (incoming / name).write_bytes(b"spooled")
    result = cbmir("reindex", "--pending", env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "sent 2 of 2 instance(s)" in result.stdout
    assert _queued_tasks(redis_env["CBMIR_QUEUE"]) == [["1.2.3.1.dcm", "1.2.3.2.dcm"]]  # one task


def test_reindex_requeue_quarantined_by_reason(redis_env: dict[str, str], data_dir: Path) -> None:
    from services.core.config import DataLayout
    from services.ingest.spool import Spool

    spool = Spool(DataLayout(data_dir))
    for name, reason in (("1.2.4.1.dcm", "corrupt-pixel-data"), ("1.2.4.2.dcm", "too-large")):
        spool.store(name, b"kept")
        spool.quarantine(spool.incoming_path(name), reason=reason, detail="test", stage="worker")
    dropped = data_dir / "dropped.png"
    dropped.write_bytes(b"not a picture")
    spool.quarantine(dropped, reason="corrupt-pixel-data", detail="test", stage="watcher")
    result = cbmir("reindex", "--requeue-quarantined", "corrupt-pixel-data", env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "sent 1 of 1 instance(s)" in result.stdout
    assert "1 file(s) quarantined by the watcher are left in quarantine" in result.stdout
    assert [p.name for p in spool.pending()] == ["1.2.4.1.dcm"]
    assert sorted(entry.reason for entry in spool.quarantine_entries()) == ["corrupt-pixel-data", "too-large"]
    assert _queued_tasks(redis_env["CBMIR_QUEUE"]) == [["1.2.4.1.dcm"]]


def test_long_running_commands_take_their_flags(
    redis_env: dict[str, str], data_dir: Path, tmp_path: Path, procs: list[support.Proc]
) -> None:
    watch = support.Proc(
        "watch", [str(support.CBMIR), "watch", "--settle", "2", str(tmp_path / "in")], redis_env
    )
    procs.append(watch)
    watch.wait_for(r"cbmir watch: watching ")
    watch.wait_for(r"settle 2\.0 s")
    scp = support.Proc("scp", [str(support.CBMIR), "scp", "--port", "0", "--ae-title", "CLITEST"], redis_env)
    procs.append(scp)
    scp.wait_for(r"cbmir scp: AE CLITEST listening on 127\.0\.0\.1:\d+")
    worker = support.Proc(
        "worker",
        [str(support.CBMIR), "worker", "--concurrency", "1", "--hostname", "clitest@localhost"],
        redis_env,
    )
    procs.append(worker)
    worker.wait_for(r"clitest@localhost ready")
    worker.wait_for(r"1 threads", timeout_s=5)
