"""The keyed patient reference: how cbmir can tell two instances belong to one patient without
ever storing who that patient is.

``patient_key`` is HMAC-SHA256 of the issuer and the Patient ID under a site secret
(``CBMIR_PATIENT_KEY_SECRET``), cut to 32 hex digits. The payload of a point carries it, never the
ID; without the secret nobody can compute it from an ID, and nobody can compute an ID from it. It
selects a patient's instances for erasure (``cbmir delete --patient-key``).
"""

from __future__ import annotations

import hashlib
import hmac
import re

PATIENT_KEY_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """The keyed reference of (issuer, Patient ID); an empty Patient ID has none ("")."""
    patient_id = patient_id.strip()
    if not patient_id:
        return ""
    message = issuer.strip().encode("utf-8") + b"\x00" + patient_id.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]
