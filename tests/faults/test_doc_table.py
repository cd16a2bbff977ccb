"""docs/bad_inputs.md stays true: every test it names exists in this suite, and every test here is in the table."""
from __future__ import annotations

import re

from faults_helpers import REPO


def test_the_table_and_the_suite_name_the_same_tests():
    table = (REPO / "docs" / "bad_inputs.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", table))
    defined = {name for path in (REPO / "tests" / "faults").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE)}
    defined.discard("test_the_table_and_the_suite_name_the_same_tests")
    assert named - defined == set(), "the table names tests that do not exist"
    assert defined - named == set(), "tests missing from docs/bad_inputs.md"
