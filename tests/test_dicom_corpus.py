"""The malformed/unsupported corpus of tests/corpus/malformed.py: each file raises its cbmir error."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest

from services.core import errors
from services.dicom.decode import DecodeLimits, decode_for_embedding, read_header

GENERATOR = Path(__file__).resolve().parent / "corpus" / "malformed.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("cbmir_malformed_corpus", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("malformed")
    index_path = load_generator().generate(out)
    return out, json.loads(index_path.read_text())


def test_corpus_covers_the_required_cases(corpus) -> None:
    _, index = corpus
    expected = {case["expected_error"] for case in index["cases"]}
    assert expected == {"UnreadableInput", "UnsupportedInput", "DecodeError", "TooLarge"}
    assert len(index["cases"]) >= 12


def test_each_file_raises_its_expected_error(corpus) -> None:
    out, index = corpus
    limits = DecodeLimits(**index["limits"])
    outcomes = {}
    for case in index["cases"]:
        expected = getattr(errors, case["expected_error"])
        with pytest.raises(errors.CbmirError) as info:
            decode_for_embedding(out / case["file"], limits=limits)
        assert type(info.value) is expected, f"{case['file']}: {info.value!r}"
        assert info.value.reason == case["expected_reason"], f"{case['file']}: {info.value}"
        outcomes[case["file"]] = f"{case['expected_error']}:{info.value.reason}"
    print("malformed corpus:", outcomes)


def test_header_reading_fails_only_with_cbmir_errors(corpus) -> None:
    out, index = corpus
    for case in index["cases"]:
        with contextlib.suppress(errors.CbmirError):
            read_header(out / case["file"])
