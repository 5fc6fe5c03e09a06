"""The evaluation through the whole DICOM path equals the offline evaluation.

The database of a small stratified subset of ../shared/data becomes DICOM (CR, MR, OCT, EEG
waveform), is pushed over C-STORE to ``cbmir serve`` and indexed by a real worker; queries go over
gRPC as DICOM bytes. Every metric must equal the offline numbers for all four modalities.
"""

from __future__ import annotations

import json

import pytest

from tests import support

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_service_numbers_equal_offline_numbers(data_dir, procs, tmp_path):
    if not (support.SHARED_DATA / "manifest.csv").exists():
        pytest.skip("../shared/data is not present")
    from models.evaluate import run_evaluation
    from services.ops.evaluate import ServiceRetriever

    subset = 6  # items per finding, for queries and database alike
    offline = run_evaluation(
        support.SHARED_DATA, ["test"], ["train", "val"], tmp_path / "offline", subset=subset, plots=False
    )
    env = support.base_env(data_dir)
    serve, dicom_port, grpc_port = support.start_serve(data_dir, env)
    procs.append(serve)
    retriever = ServiceRetriever(
        f"127.0.0.1:{grpc_port}",
        "127.0.0.1",
        dicom_port,
        work_dir=tmp_path / "dicom",
        timeout_s=600,
    )
    service = run_evaluation(
        support.SHARED_DATA,
        ["test"],
        ["train", "val"],
        tmp_path / "service",
        subset=subset,
        plots=False,
        retriever=retriever,
        pr_depth=100,
    )
    assert service["retriever"] == "ServiceRetriever"
    assert service["data"]["n_database"] == offline["data"]["n_database"]
    assert set(service["finding"]) >= {"xray", "mri", "oct", "eeg", "overall"}
    for level in ("modality", "finding"):
        assert json.dumps(service[level], sort_keys=True) == json.dumps(offline[level], sort_keys=True), level
