"""tests/data holds copies of reference files: they must still match the hashes in its README."""

import hashlib
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def test_data_files_match_the_hashes_in_the_readme():
    listed = dict((name, digest) for digest, name in
                  re.findall(r"^([0-9a-f]{64})  (\S+)$", (DATA / "README.md").read_text(), re.M))
    present = {str(p.relative_to(DATA)) for p in DATA.rglob("*.json")}
    assert present == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
