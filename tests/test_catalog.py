from __future__ import annotations

from pathlib import Path

import pytest

from labrunner.catalog import CatalogError, load_catalog, load_lab


def test_roadmap_has_80_concepts_in_8_phases() -> None:
    catalog = load_catalog()
    assert [p.id for p in catalog.phases] == [f"ph{n}" for n in range(8)]
    assert len(catalog.concepts) == 80
    assert [len(p.concepts) for p in catalog.phases] == [8, 10, 12, 8, 10, 10, 10, 12]
    assert len({c.slug for c in catalog.concepts}) == 80


def test_prerequisites_follow_the_roadmap() -> None:
    requires = {p.id: p.requires for p in load_catalog().phases}
    assert requires == {
        "ph0": (), "ph1": ("ph0",), "ph2": ("ph1",), "ph3": ("ph1",), "ph4": ("ph0", "ph2"),
        "ph5": ("ph2", "ph4"), "ph6": ("ph3", "ph5"), "ph7": ("ph6",),
    }


def test_titles_and_categories_come_from_concepts_tsv() -> None:
    concept = load_catalog().concept("ph2.5")
    assert concept.slug == "isolation-levels"
    assert concept.category == "Transactions"
    assert concept.title.startswith("Isolation levels")


@pytest.mark.parametrize(("selector", "expected"), [
    ("ph2", 12), ("ph2.5", 1), ("isolation-levels", 1), ("ISOLATION-LEVELS", 1), ("all", 80),
])
def test_selectors(selector: str, expected: int) -> None:
    items = load_catalog().select([selector])
    assert len([i for i in items if not i.id.endswith(".c")]) == expected


def test_selectors_dedupe_and_keep_roadmap_order() -> None:
    items = load_catalog().select(["ph2.5", "ph0.1", "ph2"])
    ids = [i.id for i in items if not i.id.endswith(".c")]
    assert ids[0] == "ph0.1" and ids.count("ph2.5") == 1 and len(ids) == 13


def test_unknown_selector_suggests_closest() -> None:
    with pytest.raises(CatalogError, match="isolation-levels"):
        load_catalog().select(["isolaton-levels"])
    with pytest.raises(CatalogError, match="ph2"):
        load_catalog().select(["ph22"])


def test_concept_without_lab_is_listed_as_such(tmp_path: Path) -> None:
    (tmp_path / "labs").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    catalog = load_catalog(tmp_path)
    assert all(c.lab is None for c in catalog.concepts)
    assert catalog.labs == []


def _lab(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "labs" / "ph2" / "05-isolation-levels"
    folder.mkdir(parents=True)
    (folder / "lab.toml").write_text(text)
    return folder


@pytest.mark.parametrize(("text", "complaint"), [
    ('slug = "isolation-levels"\nlearner_files = ["a.py"]', "missing field 'id'"),
    ('id = "2.5"\nslug = "x"\nlearner_files = ["a.py"]', "field 'id'"),
    ('id = "ph2.5"\nslug = "isolation-levels"\nservices = ["mysql"]\n'
     'learner_files = ["a.py"]', "unknown service 'mysql'"),
    ('id = "ph2.5"\nslug = "isolation-levels"\nlearner_files = ["a.py"]\npoints = "ten"',
     "field 'points'"),
    ('id = "ph2.5"\nslug = "isolation-levels"', "learner_files"),
    ('id = "ph2.5"\nslug = "isolation-levels"\nlearner_files = ["../x.py"]', "plain relative"),
    ('id = "ph2.5"\nslug = [', "not valid TOML"),
])
def test_malformed_lab_file_names_file_and_field(tmp_path: Path, text: str,
                                                 complaint: str) -> None:
    folder = _lab(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        load_lab(folder, {"ph2.5": {"title": "t", "category": "c"}})
    assert str(folder / "lab.toml") in str(err.value)
    assert complaint in str(err.value)


def test_slug_must_match_the_roadmap(tmp_path: Path) -> None:
    _lab(tmp_path, 'id = "ph2.5"\nslug = "isolation"\nlearner_files = ["a.py"]')
    (tmp_path / "pyproject.toml").write_text("")
    with pytest.raises(CatalogError, match="isolation-levels"):
        load_catalog(tmp_path)


def test_every_lab_in_the_repo_is_complete() -> None:
    for lab in load_catalog().labs:
        assert (lab.path / "README.md").is_file(), f"{lab.path}: README.md missing"
        assert lab.starter_dir.is_dir() and lab.solution_dir.is_dir(), lab.path
        assert lab.test_files, f"{lab.path}: no test_*.py"
        for name in lab.learner_files:
            assert (lab.solution_dir / name).exists(), f"{lab.solution_dir / name} missing"
            assert (lab.starter_dir / name).exists(), f"{lab.starter_dir / name} missing"


def test_a_draft_lab_is_listed_but_never_run(tmp_path: Path) -> None:
    folder = _lab(tmp_path, 'id = "ph2.5"\nslug = "isolation-levels"\n'
                            'learner_files = ["a.py"]\ndraft = true')
    (tmp_path / "pyproject.toml").write_text("")
    catalog = load_catalog(tmp_path)
    assert catalog.concept("ph2.5").lab is None
    assert [d.path for d in catalog.drafts] == [folder.resolve()]
    assert catalog.labs == []


def test_parsed_lab_files_are_kept_by_content_and_an_edit_or_a_break_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog keeps parsed lab.toml files in the user's cache: a second load reads them
    from there, an edited file is read again, a file broken after it was kept still fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "pyproject.toml").write_text("")
    folder = _lab(tmp_path, 'id = "ph2.5"\nslug = "isolation-levels"\n'
                            'learner_files = ["a.py"]\npoints = 10')
    assert load_catalog(tmp_path).lab("ph2.5").points == 10
    assert (tmp_path / "cache" / "labrunner" / "lab-toml.json").is_file()
    assert load_catalog(tmp_path).lab("ph2.5").points == 10
    (folder / "lab.toml").write_text('id = "ph2.5"\nslug = "isolation-levels"\n'
                                     'learner_files = ["a.py"]\npoints = 20')
    assert load_catalog(tmp_path).lab("ph2.5").points == 20
    (folder / "lab.toml").write_text('id = "ph2.5"\nslug = "isolation-levels"\n'
                                     'learner_files = ["a.py"]\npoints = "ten"')
    with pytest.raises(CatalogError, match="field 'points'"):
        load_catalog(tmp_path)
    (tmp_path / "cache" / "labrunner" / "lab-toml.json").write_text("{not json")
    (folder / "lab.toml").write_text('id = "ph2.5"\nslug = "isolation-levels"\n'
                                     'learner_files = ["a.py"]\npoints = 30')
    assert load_catalog(tmp_path).lab("ph2.5").points == 30
