"""ShapesBench v1: fixed, balanced, valid, reproducible from its seed."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from asyndm.shapes.suite import SUITES, SuiteEntry, build_suite, load_suite, suite_json
from asyndm.shapes.grammar import parse_prompt
from asyndm.shapes.world import CATEGORIES


def test_loads_balanced_and_valid():
    entries = load_suite()
    assert len(entries) >= 120
    counts = Counter(e.category for e in entries)
    assert set(counts) == set(CATEGORIES) and len(set(counts.values())) == 1
    assert len({e.prompt for e in entries}) == len(entries)
    for e in entries:
        words = e.prompt.split()
        for subject in e.subjects:
            n = len(subject.split())
            assert any(words[i:i + n] == subject.split() for i in range(len(words)))
        assert e.k == (0.3,) * len(e.subjects)
        spec = parse_prompt(e.prompt)
        assert (spec.category, spec.subjects) == (e.category, e.subjects)


def test_file_is_versioned_and_reproducible():
    text = SUITES["shapes"].read_text(encoding="utf-8")
    assert json.loads(text)["version"] == "v1"
    # A grammar change that alters this must ship as a new suite version, not an edit.
    assert suite_json(build_suite()) == text


def test_entry_defaults_and_validation():
    assert SuiteEntry("a red circle", "single", ("red circle",)).k == (0.3,)
    with pytest.raises(ValueError, match="whole words"):
        SuiteEntry("a red circle", "single", ("red circ",))
    with pytest.raises(ValueError, match="one k per subject"):
        SuiteEntry("a red circle", "single", ("red circle",), (0.3, 0.3))


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "a circle", "category": "single"}, "entry 1"),
    ({"prompt": "a circle", "category": "single", "subjects": ["square"]}, "entry 1"),
    ({"prompt": "a circle", "category": "two", "subjects": ["circle"]}, "entry 1"),
    ({"prompt": "a hexagon", "category": "single", "subjects": ["hexagon"]}, "entry 1"),
])
def test_bad_entries_name_file_and_index(tmp_path, bad, message):
    good = {"prompt": "a square", "category": "single", "subjects": ["square"], "k": [0.3]}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"version": "v1", "entries": [good, bad]}))
    with pytest.raises(ValueError, match=message) as err:
        load_suite(str(path))
    assert str(path) in str(err.value)


def test_wrong_version_is_refused(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"version": "v0", "entries": []}))
    with pytest.raises(ValueError, match="version"):
        load_suite(str(path))
