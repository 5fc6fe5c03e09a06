import os
import uuid
from pathlib import Path

import pytest

from tests import support


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def procs():
    """Processes started by a test; all stopped (and their output shown on failure) at the end."""
    started: list[support.Proc] = []
    yield started
    for proc in reversed(started):
        proc.signal(__import__("signal").SIGCONT)
        proc.stop()


@pytest.fixture
def redis_env(data_dir: Path) -> dict:
    if not support.redis_available():
        if os.environ.get("CI"):
            pytest.fail("Redis is not reachable at " + support.REDIS_URL)
        pytest.skip("Redis is not reachable at " + support.REDIS_URL)
    return support.base_env(
        data_dir,
        CBMIR_BROKER_URL=support.REDIS_URL,
        CBMIR_QUEUE=f"cbmir.test.{uuid.uuid4().hex[:10]}",
    )


@pytest.fixture
def need_dcmtk():
    if not support.dcmtk_available():
        if os.environ.get("CI"):
            pytest.fail("dcmtk (storescu) is not installed")
        pytest.skip("dcmtk (storescu) is not installed")
