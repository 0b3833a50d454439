"""The documentation stays true to the code: every config key is documented with its real
default, the Python examples run, and links between the docs resolve."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmfn.config import Config, parse_value

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION = REPO / "docs" / "configuration.md"
OWN_DOCS = ["tutorial.md", "configuration.md", "troubleshooting.md", "architecture.md"]
RUNNABLE_DOCS = ["callbacks.md", "data.md"]  # their Python blocks run as written, in order
# A reference table row: | `section.key` | `default` | meaning |
ROW = re.compile(r"^\| `(\w+)\.(\w+)` \| `([^`]*)` \|", re.MULTILINE)
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def config_fields() -> dict[str, dict[str, object]]:
    """{section: {key: default}} for every dataclass field of every Config section."""
    sections = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        sections[section.name] = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
        }
    return sections


def documented_rows() -> dict[tuple[str, str], str]:
    return {
        (section, key): default
        for section, key, default in ROW.findall(CONFIGURATION.read_text(encoding="utf-8"))
    }


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text(encoding="utf-8"))


def run_python(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMFN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_config_field_is_documented():
    text = CONFIGURATION.read_text(encoding="utf-8")
    missing = [
        f"{section}.{key}"
        for section, fields in config_fields().items()
        for key in fields
        if f"`{section}.{key}`" not in text
    ]
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def documented_value(text: str, default):
    """A reference row's default as the config would read it (YAML 1.1 leaves 3e-4 a string;
    float fields take it as a float)."""
    value = parse_value(text)
    return float(value) if isinstance(default, float) and isinstance(value, str) else value


def test_every_config_field_has_a_reference_row_with_its_real_default():
    rows = documented_rows()
    problems = []
    for section, fields in config_fields().items():
        for key, default in fields.items():
            if (section, key) not in rows:
                problems.append(f"{section}.{key}: no '| `{section}.{key}` | `default` |' row")
            elif documented_value(rows[section, key], default) != default:
                problems.append(
                    f"{section}.{key}: documented default {rows[section, key]!r}, code has {default!r}"
                )
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


def test_no_reference_row_names_a_key_that_does_not_exist():
    fields = config_fields()
    stale = [
        f"{section}.{key}"
        for section, key in documented_rows()
        if key not in fields.get(section, {})
    ]
    assert not stale, f"docs/configuration.md documents keys the code lacks: {', '.join(stale)}"


def test_readme_python_blocks_run():
    blocks = python_blocks(REPO / "README.md")
    assert blocks, "README.md has no ```python block to check"
    for block in blocks:
        result = run_python(block, timeout=600)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-3000:]}"


def test_configuration_python_blocks_run():
    blocks = python_blocks(CONFIGURATION)
    assert blocks
    result = run_python("\n".join(blocks), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_tutorial_python_blocks_run_in_order():
    """The tutorial's ```python blocks build on each other: run them as one script."""
    blocks = python_blocks(REPO / "docs" / "tutorial.md")
    assert len(blocks) > 10
    result = run_python("\n\n".join(blocks), timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.mark.parametrize("name", RUNNABLE_DOCS)
def test_the_python_blocks_of_a_page_run(name):
    blocks = python_blocks(REPO / "docs" / name)
    assert blocks
    result = run_python("\n\n".join(blocks), timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]


def anchors(path: Path) -> set[str]:
    """GitHub-style anchors of a markdown file's headings."""
    slugs = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("name", OWN_DOCS)
def test_relative_links_resolve(name):
    doc = REPO / "docs" / name
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            broken.append(target)
    assert not broken, f"docs/{name} has broken links: {broken}"
