"""Prometheus metrics, scraped over HTTP from real processes after a real push.

``cbmir serve --metrics-port 0`` serves the merged metrics of all its parts on one port; the
separate processes (``cbmir scp``, ``worker``, ``query`` on Redis) each serve their own with
``CBMIR_METRICS_PORT=0``. Both integration tests read the counters before and after dcmtk's
storescu pushes real DICOM, a worker indexes it and a client searches, and check the values moved
by exactly what happened. The Grafana dashboard may only use metrics that exist.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.query.client import SearchClient
from tests import support

METRICS_LINE = r"metrics on (http://127\.0\.0\.1:\d+/metrics)"
# small real instances of three modalities (decoding them is quick)
PUSHED = {"MR_small.dcm": "mri", "CT_small.dcm": "other", "RG1_UNCI.dcm": "xray"}


class Scrape:
    """One scrape of a /metrics endpoint."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            self.text = response.read().decode()
        self.samples = [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        ]

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the matching samples; 0 when there is none (a counter never touched)."""
        return sum(self.values(name, **labels))

    def by_label(self, name: str, label: str) -> Mapping[str, float]:
        return {have[label]: value for sample, have, value in self.samples if sample == name}


def _no_pixel_instance(folder: Path) -> Path:
    """A Secondary Capture instance without Pixel Data: the listener takes it, the worker
    quarantines it (reason missing-pixel-data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    path = folder / "no-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_no_uid(scrape: Scrape, files: list[Path]) -> None:
    for path in files:
        assert support.sop_uid(path) not in scrape.text  # labels are vocabularies, never UIDs


@pytest.mark.integration
def test_serve_exposes_all_parts_on_one_port(data_dir, procs, need_dcmtk, tmp_path):
    files = [support.pydicom_file(name) for name in PUSHED]
    broken = _no_pixel_instance(tmp_path)
    serve, dicom_port, grpc_port = support.start_serve(
        data_dir, support.base_env(data_dir), "--metrics-port", "0"
    )
    procs.append(serve)
    url = serve.wait_for(METRICS_LINE, timeout_s=10).group(1)
    assert serve.output().count("metrics on http://") == 1  # one endpoint: the children serve none

    before = Scrape(url)
    assert before.value("cbmir_dicom_instances_received_total", status="success") == 0
    assert before.values("cbmir_spool_pending_instances") == [0]
    assert before.values("cbmir_queue_messages", queue="cbmir.embed") == [0]

    support.storescu(dicom_port, [*files, broken])
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    try:
        support.wait_until(
            lambda: client.stats().total == len(files) and client.stats().quarantined == 1,
            120,
            "three instances indexed, one quarantined",
        )
        hits = client.search(sop_instance_uid=support.sop_uid(files[0]), k=2, exclude_self=False).hits
        assert hits[0].sop_instance_uid == support.sop_uid(files[0])
    finally:
        client.close()
    # the index owner refreshes its point gauge every 5 s
    support.wait_until(
        lambda: Scrape(url).value("cbmir_index_points") == len(files), 15, "index points gauge"
    )

    after = Scrape(url)
    # listener (scp child)
    assert after.value("cbmir_dicom_instances_received_total", status="success") == len(files) + 1
    assert after.value("cbmir_dicom_associations_total", result="accepted") == 1
    assert after.value("cbmir_dicom_received_bytes_total") >= sum(p.stat().st_size for p in files)
    assert after.value("cbmir_dicom_store_duration_seconds_count") == len(files) + 1
    assert after.value("cbmir_tasks_sent_total", result="sent") == len(files) + 1
    # worker child
    assert after.by_label("cbmir_instances_indexed_total", "modality") == {
        modality: float(list(PUSHED.values()).count(modality)) for modality in PUSHED.values()
    }
    assert after.value("cbmir_tasks_total", outcome="indexed") == len(files)
    assert after.value("cbmir_tasks_total", outcome="quarantined") == 1
    assert after.value("cbmir_instances_quarantined_total", stage="worker", reason="missing-pixel-data") == 1
    # observed once per task (a batch): every task decodes; those with an image also embed and write
    stages = {
        s: after.value("cbmir_worker_stage_duration_seconds_count", stage=s)
        for s in ("decode", "embed", "upsert")
    }
    assert 1 <= stages["embed"] == stages["upsert"] <= stages["decode"] <= len(files) + 1
    # query child
    assert after.value("cbmir_search_requests_total", kind="sop_instance_uid", code="OK") == 1
    assert after.value("cbmir_search_duration_seconds_count", kind="sop_instance_uid") == 1
    assert after.value("cbmir_index_points", modality="mri") == 1
    # read by serve itself at the scrape: the spool and the embedded broker's queue
    assert after.values("cbmir_spool_pending_instances") == [0]
    assert after.values("cbmir_spool_oldest_pending_age_seconds") == [0]
    assert after.by_label("cbmir_quarantine_instances", "reason") == {"missing-pixel-data": 1}
    assert after.values("cbmir_queue_messages", queue="cbmir.embed") == [0]
    _assert_no_uid(after, [*files, broken])

    serve.stop()
    assert serve.process.returncode == 0


@pytest.mark.integration
def test_separate_processes_each_serve_their_own(redis_env, procs, need_dcmtk):
    files = [support.pydicom_file(name) for name in list(PUSHED)[:2]]
    env = dict(redis_env, CBMIR_METRICS_PORT="0")
    query, grpc_port, scp, dicom_port, worker = support.start_parts(env, procs)
    urls = {proc.name: proc.wait_for(METRICS_LINE, timeout_s=10).group(1) for proc in (query, scp, worker)}
    assert len(set(urls.values())) == 3
    before = {name: Scrape(url) for name, url in urls.items()}
    assert before["scp"].value("cbmir_dicom_instances_received_total", status="success") == 0
    assert before["worker"].value("cbmir_instances_indexed_total") == 0
    assert before["query"].value("cbmir_search_requests_total") == 0

    support.storescu(dicom_port, files)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    try:
        support.wait_until(lambda: client.stats().total == len(files), 90, "both instances indexed")
        client.search(dicom=files[1].read_bytes(), k=1)
    finally:
        client.close()
    support.wait_until(
        lambda: Scrape(urls["query"]).value("cbmir_index_points") == len(files), 15, "index points gauge"
    )
    after = {name: Scrape(url) for name, url in urls.items()}

    scp_metrics, worker_metrics, query_metrics = after["scp"], after["worker"], after["query"]
    assert scp_metrics.value("cbmir_dicom_instances_received_total", status="success") == len(files)
    assert scp_metrics.value("cbmir_dicom_associations_total", result="accepted") == 1
    assert scp_metrics.value("cbmir_tasks_sent_total", result="sent") == len(files)
    assert scp_metrics.value("cbmir_instances_indexed_total") == 0  # each process: its own metrics
    assert worker_metrics.value("cbmir_instances_indexed_total") == len(files)
    assert worker_metrics.value("cbmir_tasks_total", outcome="indexed") == len(files)
    assert worker_metrics.values("cbmir_queue_messages", queue=redis_env["CBMIR_QUEUE"]) == [0]
    assert query_metrics.value("cbmir_search_requests_total", kind="dicom", code="OK") == 1
    assert query_metrics.value("cbmir_search_duration_seconds_count", kind="dicom") == 1
    assert query_metrics.values("cbmir_spool_pending_instances") == [0]
    assert query_metrics.values("cbmir_spool_oldest_pending_age_seconds") == [0]
    assert query_metrics.value("cbmir_dicom_instances_received_total") == 0
    for name, scrape in after.items():
        assert scrape.values("process_resident_memory_bytes"), name  # a process's own registry
        _assert_no_uid(scrape, files)


def _exported_names() -> set[str]:
    """Every sample name cbmir's metrics can have, the collectors' included."""
    from prometheus_client import REGISTRY

    from services.core import metrics
    from services.core.config import BrokerSettings

    names = set()
    families = [
        *REGISTRY.collect(),
        *metrics.SpoolCollector(None).describe(),  # describing reads nothing
        *metrics.QueueCollector(BrokerSettings("redis://127.0.0.1:1/0", "q", 300)).describe(),
    ]
    for family in families:
        if family.name.startswith("cbmir_"):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(
                family.type, [""]
            )
            names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_uses_only_exported_metrics_and_names_follow_conventions():
    names = _exported_names()
    for name in names:
        assert re.fullmatch(r"cbmir_[a-z_]+", name), name
        assert not name.endswith("_total_total") and not name.endswith("_seconds_total"), name
    dashboard = json.loads((support.REPO / "deploy" / "grafana" / "cbmir-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bcbmir_[a-z_]+", expr)}
    assert used and used <= names, used - names
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Receive rate",
        "Queue depth",
        "Index lag",
        "Quarantine by reason",
        "Search latency",
        "Indexed rate",
    } <= titles
    latency = next(p for p in dashboard["panels"] if p["title"] == "Search latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_metrics_settings_and_label_values():
    from services.core.config import MetricsSettings
    from services.core.errors import ConfigError
    from services.core.metrics import slug

    assert MetricsSettings.from_env({}) == MetricsSettings(host="127.0.0.1", port=None)  # default: none
    assert not MetricsSettings.from_env({"CBMIR_METRICS_PORT": " "}).enabled
    assert MetricsSettings.from_env({"CBMIR_METRICS_PORT": "0", "CBMIR_METRICS_HOST": "0.0.0.0"}) == (
        MetricsSettings(host="0.0.0.0", port=0)
    )
    for bad in ("x", "-1", "70000"):
        with pytest.raises(ConfigError, match="CBMIR_METRICS_PORT"):
            MetricsSettings.from_env({"CBMIR_METRICS_PORT": bad})
    assert slug("missing-pixel-data") == "missing-pixel-data"
    assert slug("MRI") == "mri"
    for not_a_vocabulary_word in ("1.2.840.113619.2.1", "Doe^John", "", None, "a b"):
        assert slug(not_a_vocabulary_word) == "other"
