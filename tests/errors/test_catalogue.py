"""The error catalogue as a whole (tests/errors/catalogue.py): its cases are distinct, the area tests
check every section exactly once, every registered method declares configurations it refuses and they
are in the catalogue, and docs/errors.md lists every case."""

from __future__ import annotations

from catalogue import AREAS, CASES, DOCS, METHOD_CASES, SECTIONS

from tinypeft.methods import METHODS


def test_cases_are_distinct():
    whens = [c.when for c in CASES]
    assert len(whens) == len(set(whens)), [w for w in whens if whens.count(w) > 1]


def test_every_section_is_checked_by_one_area():
    checked = [section for sections in AREAS.values() for section in sections]
    assert sorted(checked) == sorted(SECTIONS), "a section no area test checks, or one checked twice"


def test_every_method_adds_the_configurations_it_refuses():
    whens = [c.when for c in METHOD_CASES]
    for name, spec in METHODS.items():
        declared = [c.when for c in spec.error_cases()]
        assert declared, f"{name} declares no error case"
        assert set(declared) <= set(whens), name
    assert len(whens) == sum(len(spec.error_cases()) for spec in METHODS.values())


def test_docs_list_every_case():
    text = DOCS.read_text()
    absent = [c.when for c in CASES if f"| {c.when} |" not in text]
    assert not absent, (
        f"docs/errors.md lacks {absent}; regenerate it: PYTHONPATH=.:tests python tests/errors/catalogue.py"
    )
