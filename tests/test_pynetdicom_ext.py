"""services/dicom/pynetdicom_ext: the per-association streaming of C-STORE data sets, driven with
messages that pynetdicom's own encoder fragments (no network: the cases real senders rarely make)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_context

from services.dicom.pynetdicom_ext import SpoolingDIMSEProvider
from tests import support

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def provider(tmp_path: Path) -> SpoolingDIMSEProvider:
    """A provider on an acceptor association with MR Image Storage accepted as context 1."""
    assoc = Association(AE(), "acceptor")
    context = build_context(MR_IMAGE, EXPLICIT_LE)
    context.context_id = 1
    assoc._accepted_cx = {1: context}  # what negotiation would have left (no network here)
    return SpoolingDIMSEProvider(assoc, tmp_path)


def _fragments(max_pdu: int = 4096) -> tuple[list[P_DATA], bytes]:
    """A C-STORE-RQ for MR_small.dcm as pynetdicom sends it, and the data set bytes it carries."""
    ds = pydicom.dcmread(support.pydicom_file("MR_small.dcm"))
    request = C_STORE()
    request.MessageID, request.Priority = 7, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    body = encode(ds, False, True)
    request.DataSet = io.BytesIO(body)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, max_pdu)), body


def test_several_fragments_in_one_p_data_are_streamed_to_one_file(provider, tmp_path):
    primitives, body = _fragments()
    assert len(primitives) > 2  # command, then the data set in several fragments
    merged = P_DATA()
    merged.presentation_data_value_list = [
        list(pdv) for p in primitives for pdv in p.presentation_data_value_list
    ]
    provider.receive_primitive(merged)
    _, received = provider.get_msg(block=False)
    assert isinstance(received, C_STORE) and received._dataset_path is not None
    data = Path(received._dataset_path).read_bytes()
    assert data[128:132] == b"DICM" and data.endswith(body)
    assert pydicom.dcmread(received._dataset_path).SOPInstanceUID == received.AffectedSOPInstanceUID
    assert [p.name for p in tmp_path.iterdir()] == [Path(received._dataset_path).name]


def test_a_connection_closed_mid_data_set_leaves_no_file(provider, tmp_path):
    primitives, _ = _fragments()
    for primitive in primitives[:2]:  # the command and the first data set fragment
        provider.receive_primitive(primitive)
    assert len(list(tmp_path.iterdir())) == 1
    provider.discard_incomplete()
    assert not list(tmp_path.iterdir())
    assert provider.get_msg(block=False) == (None, None)


@pytest.mark.parametrize("cause", ["the folder cannot take a file", "the volume is below its watermark"])
def test_a_data_set_that_cannot_be_spooled_is_dropped_not_held(provider, tmp_path, cause):
    """Neither a file nor memory: the data set is dropped as it arrives, and the handler finds no
    file at the path it is given (it answers 0xA700)."""
    if cause.startswith("the folder"):
        provider._spool_dir = tmp_path / "missing"  # mkstemp fails
    else:
        provider._has_room = lambda: False
    primitives, _ = _fragments()
    for primitive in primitives:
        provider.receive_primitive(primitive)
    _, received = provider.get_msg(block=False)
    assert received._dataset_path is not None and not Path(received._dataset_path).exists()
    assert received.DataSet.getvalue() == b""
    assert not list(tmp_path.iterdir())
