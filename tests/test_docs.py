"""The documentation is checked like code: the stage pages are what the code renders (every config field on
its stage's page), the README stays a short entry point, and no measurement narrative sits in library code
or settings help (measurements live in bench/log and the decision records). `make test` also builds the site
with `mkdocs build --strict`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tracecore.flows.docs import DOCS, config_fields, write_stage_pages
from tracecore.tasks.runtime.registry import registry

ROOT = Path(__file__).resolve().parents[1]
CODE = ["flows", "tasks", "kernels", "storage", "configs"]
# A measurement narrative: a date, an ordinal run, an issue number, or "measured" with a figure in its clause.
ORDINALS = "third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\\d+(st|nd|rd|th)"
NARRATIVE = [re.compile(p, re.I) for p in (
    r"\b20\d\d-\d\d-\d\d\b", rf"\b({ORDINALS})( and \w+)? runs?\b", r"\bissue #?\d+",
    r"\bmeasured\b[^.;)\"]{0,160}?\d", r"\d[^.;(\n]{0,60},\s*measured\b")]


def test_stage_pages_are_what_the_code_renders():
    """`tracecore docs --check`: a config field, default or docstring edited without `make docs`
    fails here."""
    assert write_stage_pages(check=True) == [], "stage pages are stale: run `make docs`"


@pytest.mark.parametrize("name", list(registry()))
def test_every_config_field_is_on_its_stage_page(name):
    page = (DOCS / "stages" / f"{name}.md").read_text()
    section = page.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9_.]+)` \| `", section, re.M))
    assert listed == config_fields(registry()[name].config), name


def test_a_page_lists_a_new_field():
    """The comparison can fail: a field added to a config appears in the rendered page, so the committed
    page no longer matches until `make docs` runs."""
    import dataclasses

    from pydantic import create_model
    from tracecore.flows.docs import render_stage_page

    stage = registry()["select"]
    extended = create_model("SelectConfig", __base__=stage.config, brand_new_knob=(int, 3))
    rendered = render_stage_page(dataclasses.replace(stage, config=extended))
    assert "| `brand_new_knob` | `int` | `3` |" in rendered
    assert rendered != (DOCS / "stages" / "select.md").read_text()


def test_readme_is_a_short_entry_point():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250 and max(map(len, lines)) <= 300


def test_no_measurement_narrative_in_code_or_settings_help():
    hits = []
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                text = path.read_text()
                hits += [f"{path.relative_to(ROOT)}: {m.group(0)[:80]!r}"
                         for p in NARRATIVE for m in p.finditer(text)]
    assert not hits, "measurements belong in bench/log or docs/development/decisions.md:\n" + "\n".join(hits)


PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name != "decisions.md") + [ROOT / "README.md"]
BLOCK = re.compile(r"<!-- tracecore:begin (\S+) -->.*?<!-- tracecore:end \1 -->", re.S)
LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*\.\d+(?: ?(?:s|min|MB|GB|MiB|GiB|%|x|×))?(?![\w.])")


def hand_written(page: Path) -> str:
    """A page's text outside its generated blocks: what a person wrote and must keep current."""
    return BLOCK.sub("", page.read_text())


def current_figures() -> set[str]:
    """The decimal figures of bench/RESULTS.md's current-figures table, the one home of those numbers."""
    table = (ROOT / "bench" / "RESULTS.md").read_text().split("## Current figures", 1)[1].split("\n## ", 1)[0]
    values = [row.split("|")[2] for row in table.splitlines() if row.startswith("| ") and "---" not in row]
    return {m.group(0) for value in values[1:] for m in FIGURE.finditer(value)}


def repeated_figures(text: str, figures: set[str]) -> list[str]:
    return sorted({m.group(0) for m in FIGURE.finditer(text)} & figures)


def test_no_measurement_narrative_in_the_docs():
    """Dated figures and run histories live in bench/log and the decision records; pages link there."""
    texts = {page: LINK_TARGET.sub("]", hand_written(page)) for page in PAGES}  # a log's dated name is a link
    hits = [f"{page.relative_to(ROOT)}: {m.group(0)[:80]!r}" for page, text in texts.items()
            for p in NARRATIVE for m in p.finditer(text)]
    assert not hits, "move it to bench/log and link it:\n" + "\n".join(hits)


def test_no_page_repeats_a_current_figure_by_hand():
    figures = current_figures()
    assert figures, "the current-figures table has no decimal figure: the check would pass on anything"
    hits = [f"{page.relative_to(ROOT)}: {repeated_figures(hand_written(page), figures)}" for page in PAGES
            if repeated_figures(hand_written(page), figures)]
    assert not hits, "a figure of bench/RESULTS.md written by hand (link it instead):\n" + "\n".join(hits)


def test_the_repeated_figure_check_can_fail():
    assert repeated_figures("the run took 760.1 s, the peak 2,767.5 MB", {"760.1 s", "9.9 s"}) == ["760.1 s"]
    assert hand_written(ROOT / "docs" / "performance.md").count("tracecore:begin") == 0


def test_the_narrative_check_can_fail():
    assert any(p.search("(measured: 0.17 s of 0.35 s at 10^6 tokens)") for p in NARRATIVE)
    assert any(p.search("since the sixth run") for p in NARRATIVE)
    assert not any(p.search("KV bytes measured from each policy's caches after decoding.") for p in NARRATIVE)
