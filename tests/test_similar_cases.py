"""What a radiologist's query means, against a real ``cbmir serve`` over sockets.

Instances of three patients (two studies each, two images per study) go in over a real DICOM
association (dcmtk's storescu); a reference library goes in through the installed ``cbmir library
import``. The tests check: the query is never its own hit unless asked; the same patient's exams
can be left out; study-level results; the distance cut-off and paging; findings from the library;
thumbnails rendered through the display pipeline.
"""

from __future__ import annotations

import csv
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from services.query.client import SearchClient
from tests import support

pytestmark = pytest.mark.integration

SECRET = "similar-cases-test-secret-0123456789"
PATIENTS = ("PAT-A", "PAT-B", "PAT-C")


def _build_cases(folder: Path) -> dict[str, dict[str, str]]:
    """3 patients x 2 studies x 2 MR images; images of one study look alike. Returns per file
    name: its SOP Instance, study, series UIDs and patient."""
    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    del template[0xFFFCFFFC]
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict[str, str]] = {}
    for p, patient in enumerate(PATIENTS):
        for s in range(2):
            study, series = generate_uid(), generate_uid()
            base = rng.integers(0, 4096, (64, 64)).astype(np.int64)
            for i in range(2):
                ds = template.copy()
                ds.PatientID = patient
                ds.PatientName = f"Test^{patient}"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.StudyDate = f"2024{p + 1:02d}{s + 10:02d}"
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.Rows = ds.Columns = 64
                pixels = np.clip(base + rng.integers(-40, 40, (64, 64)), 0, 4095).astype(np.uint16)
                ds.PixelData = pixels.tobytes()
                name = f"{patient}-{s}-{i}.dcm"
                ds.save_as(folder / name, enforce_file_format=True)
                cases[name] = {
                    "sop": ds.SOPInstanceUID,
                    "study": study,
                    "series": series,
                    "patient": patient,
                    "date": ds.StudyDate,
                }
    return cases


def _build_library(folder: Path) -> dict[str, str]:
    """Six MR pictures with a manifest in the shared format: 3 glioma, 3 meningioma."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    labels = {}
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "modality", "label", "split", "source", "patient", "sha256"])
        for i in range(6):
            label = "glioma" if i < 3 else "meningioma"
            name = f"case-{i}.png"
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / name)
            writer.writerow([name, "mri", label, "train", "test", "", ""])
            labels[name] = label
    return labels


@dataclass
class Stack:
    client: SearchClient
    cases: dict[str, dict[str, str]]
    root: Path
    env: dict[str, str]
    target: str
    port_dicom: int

    def __iter__(self):
        return iter((self.client, self.cases, self.root, self.env))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not support.dcmtk_available():
        pytest.skip("dcmtk's storescu is not installed")
    root = tmp_path_factory.mktemp("similar")
    data_dir = root / "data"
    env = support.base_env(data_dir, CBMIR_PATIENT_KEY_SECRET=SECRET)
    proc, dicom_port, grpc_port = support.start_serve(data_dir, env)
    client = SearchClient(f"127.0.0.1:{grpc_port}")
    try:
        cases = _build_cases(root / "cases")
        support.storescu(dicom_port, [root / "cases" / name for name in cases])
        labels = _build_library(root / "library")
        result = subprocess.run(
            [str(support.CBMIR), "library", "import", str(root / "library"), "--wait", "120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "6 sent to the workers" in result.stdout, result.stdout
        total = len(cases) + len(labels)
        support.wait_until(lambda: client.stats().total == total, 120, "cases and library indexed")
        yield Stack(client, cases, root, env, f"127.0.0.1:{grpc_port}", dicom_port)
        log = proc.output()
        assert "PAT-" not in log and "Test^" not in log, "patient data in the service's log"
    finally:
        client.close()
        proc.stop()


def _uid_of(cases, name):
    return cases[name]["sop"]


def test_the_query_is_not_its_own_hit_unless_asked(stack):
    client, cases, root, _ = stack
    name = "PAT-A-0-0.dcm"
    uid = _uid_of(cases, name)
    by_default = client.search(sop_instance_uid=uid, k=5)
    assert by_default.excluded_self
    assert uid not in {h.sop_instance_uid for h in by_default.hits}
    by_file = client.search(dicom=(root / "cases" / name).read_bytes(), k=5)
    assert by_file.excluded_self and uid not in {h.sop_instance_uid for h in by_file.hits}
    assert [h.sop_instance_uid for h in by_file.hits] == [h.sop_instance_uid for h in by_default.hits]
    with_self = client.search(sop_instance_uid=uid, k=5, exclude_self=False)
    assert not with_self.excluded_self
    assert with_self.hits[0].sop_instance_uid == uid and with_self.hits[0].distance == pytest.approx(
        0, abs=1e-4
    )
    # the nearest other image is the one from the same study
    assert by_default.hits[0].sop_instance_uid == _uid_of(cases, "PAT-A-0-1.dcm")
    assert by_default.hits[0].study_date == cases[name]["date"]


def test_same_patient_exams_can_be_left_out(stack):
    client, cases, _, _ = stack
    patient_of = {c["sop"]: c["patient"] for c in cases.values()}
    uid = _uid_of(cases, "PAT-B-1-0.dcm")
    every = client.search(sop_instance_uid=uid, k=20, source="clinical")
    assert "PAT-B" in {patient_of[h.sop_instance_uid] for h in every.hits}
    others = client.search(sop_instance_uid=uid, k=20, source="clinical", exclude_same_patient=True)
    assert others.hits and {patient_of[h.sop_instance_uid] for h in others.hits} == {"PAT-A", "PAT-C"}
    assert len(others.hits) == 8


def test_study_level_results(stack):
    client, cases, _, _ = stack
    uid = _uid_of(cases, "PAT-C-0-0.dcm")
    instances = client.search(sop_instance_uid=uid, k=50, source="clinical").hits
    studies = client.search(sop_instance_uid=uid, k=50, source="clinical", group_by="study").hits
    assert len(studies) == 6  # every study once, the query's own study with its other image
    assert len({h.study_instance_uid for h in studies}) == 6
    assert [h.distance for h in studies] == sorted(h.distance for h in studies)
    for hit in studies:
        mine = [h for h in instances if h.study_instance_uid == hit.study_instance_uid]
        assert hit.sop_instance_uid == mine[0].sop_instance_uid  # its best-matching instance
        assert hit.distance == pytest.approx(mine[0].distance)
        assert hit.matching_instances == len(mine)
    own = next(h for h in studies if h.study_instance_uid == cases["PAT-C-0-0.dcm"]["study"])
    assert own.matching_instances == 1  # the query itself is left out
    assert client.search(sop_instance_uid=uid, k=2, source="clinical", group_by="study").next_offset == 2


def test_distance_cut_off_and_paging(stack):
    client, cases, _, _ = stack
    uid = _uid_of(cases, "PAT-A-1-1.dcm")
    every = client.search(sop_instance_uid=uid, k=50).hits
    assert len(every) == len(cases) + 6 - 1
    cut = (every[3].distance + every[4].distance) / 2
    near = client.search(sop_instance_uid=uid, k=50, max_distance=cut).hits
    assert [h.sop_instance_uid for h in near] == [h.sop_instance_uid for h in every[:4]]
    first = client.search(sop_instance_uid=uid, k=4)
    second = client.search(sop_instance_uid=uid, k=4, offset=first.next_offset)
    assert first.next_offset == 4
    assert [h.sop_instance_uid for h in [*first.hits, *second.hits]] == [
        h.sop_instance_uid for h in every[:8]
    ]
    last = client.search(sop_instance_uid=uid, k=4, offset=len(every) - 2)
    assert len(last.hits) == 2 and last.next_offset == 0
    for kwargs in ({"k": 10, "offset": 995}, {"k": 5, "max_distance": -1.0}):
        with pytest.raises(grpc.RpcError) as info:
            client.search(sop_instance_uid=uid, **kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def test_hits_carry_the_library_findings(stack):
    client, cases, root, env = stack
    stats = client.stats()
    assert stats.library == 6
    assert {(f.finding, f.count) for f in stats.library_findings} == {("glioma", 3), ("meningioma", 3)}
    uid = _uid_of(cases, "PAT-A-0-0.dcm")
    library = client.search(sop_instance_uid=uid, k=50, source="library").hits
    assert len(library) == 6
    assert {h.finding for h in library} == {"glioma", "meningioma"}
    assert all(h.source == 1 for h in library)  # CASE_SOURCE_LIBRARY
    clinical = client.search(sop_instance_uid=uid, k=50, source="clinical").hits
    assert len(clinical) == len(cases) - 1 and not any(h.finding for h in clinical)
    # importing again changes nothing: the same instances, the same findings
    again = subprocess.run(
        [str(support.CBMIR), "library", "import", str(root / "library")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "6 unchanged" in again.stdout, again.stdout + again.stderr
    assert client.stats().total == len(cases) + 6


def test_thumbnails_render_through_the_display_pipeline(stack):
    client, cases, _, _ = stack
    case = cases["PAT-B-0-1.dcm"]
    rendered = client.render(case["study"], case["series"], case["sop"], max_size=48)
    picture = Image.open(io.BytesIO(rendered.png))
    assert picture.format == "PNG" and picture.mode == "L"
    assert max(picture.size) == 48 and (rendered.width, rendered.height) == picture.size
    assert np.asarray(picture).std() > 10  # a picture, not a blank
    again = client.render(case["study"], case["series"], case["sop"], max_size=48)
    assert again.etag == rendered.etag and again.png == rendered.png
    assert client.render(case["study"], case["series"], case["sop"]).etag != rendered.etag
    for args, code in (
        ((case["study"], "1.2.3.4", case["sop"]), grpc.StatusCode.NOT_FOUND),
        ((case["study"], case["series"], "1.2.826.0.1.404"), grpc.StatusCode.NOT_FOUND),
        ((case["study"], case["series"], "not-a-uid"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.render(*args)
        assert info.value.code() == code, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.render(case["study"], case["series"], case["sop"], max_size=5000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_exclude_same_patient_without_a_site_secret_says_so(data_dir, procs):
    env = support.base_env(data_dir)
    proc, port = support.start_query(env)
    procs.append(proc)
    client = SearchClient(f"127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as info:
        client.search(sop_instance_uid="1.2.3", exclude_same_patient=True)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CBMIR_PATIENT_KEY_SECRET" in info.value.details()
    client.close()


def _cbmir(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(support.CBMIR), *args], env=env, capture_output=True, text=True, timeout=300)


def test_findings_survive_a_reindex_and_leave_with_an_erasure(stack):
    # runs after the others: it changes the collection and erases one library case
    client, cases, _, env = stack
    server = ["--server", stack.target]
    query = _uid_of(cases, "PAT-A-0-0.dcm")
    before = {
        h.sop_instance_uid: h.finding
        for h in client.search(sop_instance_uid=query, k=50, source="library").hits
    }
    done = _cbmir(env, "reindex", *server)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {
        h.sop_instance_uid: h.finding
        for h in client.search(sop_instance_uid=query, k=50, source="library").hits
    }
    assert after == before and len(after) == 6

    erased_uid = next(iter(after))
    erased = _cbmir(env, "delete", "--instance", erased_uid, *server)
    assert erased.returncode == 0, erased.stdout + erased.stderr
    stats = client.stats()
    assert stats.library == 5 and stats.total == len(cases) + 5
    left = client.search(sop_instance_uid=query, k=50, source="library").hits
    assert erased_uid not in {h.sop_instance_uid for h in left} and len(left) == 5


def test_no_patient_data_leaves_the_service(stack):
    client, cases, _, _ = stack
    uid = _uid_of(cases, "PAT-C-1-1.dcm")
    response = client.search(sop_instance_uid=uid, k=50, group_by="study")
    text = str(response) + str(client.stats())
    assert "PAT-" not in text and "Test^" not in text


def test_an_upload_cannot_name_the_patient_to_leave_out(stack):
    """The patient left out is the one the index holds for the query instance: an upload that
    names another Patient ID learns nothing about that patient's studies."""
    import pydicom

    client, cases, root, _ = stack
    name = "PAT-A-1-0.dcm"
    by_uid = client.search(
        sop_instance_uid=cases[name]["sop"], k=20, exclude_same_patient=True, source="clinical"
    )
    ds = pydicom.dcmread(root / "cases" / name)
    ds.PatientID = "PAT-B"  # a guess the upload cannot make count
    forged = root / "forged.dcm"
    ds.save_as(forged, enforce_file_format=True)
    by_upload = client.search(dicom=forged.read_bytes(), k=20, exclude_same_patient=True, source="clinical")
    assert [h.sop_instance_uid for h in by_upload.hits] == [h.sop_instance_uid for h in by_uid.hits]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.99.1"  # not indexed
    ds.save_as(forged, enforce_file_format=True)
    with pytest.raises(grpc.RpcError) as info:
        client.search(dicom=forged.read_bytes(), k=20, exclude_same_patient=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "indexed" in info.value.details()


def test_a_sender_cannot_make_its_object_a_library_case(stack):
    """An object sent under a library case's SOP Instance UID (which every hit shows) is indexed as a
    clinical case without the finding."""
    import pydicom

    client, cases, root, _ = stack
    query = _uid_of(cases, "PAT-A-0-0.dcm")
    target = client.search(sop_instance_uid=query, k=1, source="library").hits[0]
    assert target.finding
    ds = pydicom.dcmread(root / "cases" / "PAT-C-0-0.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = target.sop_instance_uid
    ds.PatientID = "SPOOFER"
    spoof = root / "spoof.dcm"
    ds.save_as(spoof, enforce_file_format=True)
    before = client.stats().library
    support.storescu(stack.port_dicom, [spoof])
    support.wait_until(lambda: client.stats().library == before - 1, 60, "the spoofed object indexed")
    hits = client.search(sop_instance_uid=target.sop_instance_uid, k=5, exclude_self=False).hits
    (hit,) = [h for h in hits if h.sop_instance_uid == target.sop_instance_uid]
    assert hit.distance == pytest.approx(0, abs=1e-4)  # the sender's pixels (a copy of PAT-C's)
    assert hit.finding == "" and hit.source == 2  # CASE_SOURCE_CLINICAL
