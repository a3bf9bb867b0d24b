"""The documentation: every public name has an API reference entry, the README keeps CI's command, the site builds.

The API reference pages (``docs/api/*.md``) name what mkdocstrings renders with ``::: identifier`` lines. These tests
read those lines, so they need no documentation tooling; only the last one builds the site, when MkDocs is installed
(``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
API_PAGES = REPOSITORY / "docs" / "api"
PACKAGE = "lightning_contrastive"
# Modules whose public names must each have an entry: their ``__all__``, or, for a module without one, the classes
# and functions it defines under a public name.
DOCUMENTED_MODULES = (
    PACKAGE,
    f"{PACKAGE}.callbacks",
    f"{PACKAGE}.data",
    f"{PACKAGE}.loggers",
    f"{PACKAGE}.networks",
    f"{PACKAGE}.estimators",
    f"{PACKAGE}.learners",
    f"{PACKAGE}.compat",
)
# The same API on the unified `lightning` package: its names are the package's own, documented once.
LIGHTNING_FLAVOUR = f"{PACKAGE}.lightning"
DIRECTIVE = re.compile(r"^::: (?P<identifier>[\w.]+)\s*$", re.MULTILINE)


def api_identifiers() -> dict[str, Path]:
    """Every ``::: identifier`` of the API reference pages, with the page it is on."""
    found = {}
    for page in sorted(API_PAGES.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text()):
            found[match["identifier"]] = page
    return found


def resolve(identifier: str) -> Any:
    """The object a dotted ``identifier`` names: the longest importable module prefix, then attributes."""
    parts = identifier.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(identifier)


def source_file(module: str) -> Path:
    """The source of ``module`` inside this repository (a package's ``__init__.py``), found without importing it."""
    path = REPOSITORY.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def public_names(module: str) -> list[str]:
    """``module``'s ``__all__``, or the classes and functions it defines under a public name, read from its source."""
    tree = ast.parse(source_file(module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [node.name for node in tree.body if isinstance(node, definitions) and not node.name.startswith("_")]


def test_every_api_identifier_names_an_object() -> None:
    """A renamed or removed name leaves no stale entry: each ``::: identifier`` imports, as mkdocstrings needs."""
    identifiers = api_identifiers()
    assert identifiers, f"no ::: directives found under {API_PAGES}"
    stale = {}
    for identifier, page in identifiers.items():
        try:
            resolve(identifier)
        except (ImportError, AttributeError) as error:
            stale[identifier] = f"{page.name}: {error}"
    assert not stale, f"API reference entries that name nothing: {stale}"


@pytest.mark.parametrize("module", DOCUMENTED_MODULES)
def test_every_public_name_has_an_api_entry(module: str) -> None:
    """Each public name of ``module`` is rendered: under its own path, or as the same object under another one."""
    identifiers = api_identifiers()
    rendered = [resolve(identifier) for identifier in identifiers]
    imported = importlib.import_module(module)
    missing = [
        name
        for name in public_names(module)
        if f"{module}.{name}" not in identifiers and not any(obj is getattr(imported, name) for obj in rendered)
    ]
    assert not missing, f"{module}: no entry in docs/api/*.md for {missing}; add a '::: {module}.<name>' line."


def test_the_lightning_flavour_mirrors_the_documented_package() -> None:
    """``lightning_contrastive.lightning`` exports exactly the package's names, and its page says so."""
    assert public_names(LIGHTNING_FLAVOUR) == public_names(PACKAGE)
    assert LIGHTNING_FLAVOUR in api_identifiers()


def test_readme_holds_the_command_ci_runs() -> None:
    """The README's test command is CI's, verbatim (the last command of ``.ci/run``)."""
    ci_command = [line for line in (REPOSITORY / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    readme_lines = (REPOSITORY / "README.md").read_text().splitlines()
    assert f"    {ci_command}" in readme_lines


@pytest.mark.parametrize("page", ["README.md", "RESULTS.md"])
def test_relative_links_of_the_top_level_pages_exist(page: str) -> None:
    """The README's and RESULTS.md's links into the documentation work on GitHub too (relative file links)."""
    text = (REPOSITORY / page).read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (REPOSITORY / t).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_the_docs_name_no_path_of_a_particular_machine() -> None:
    """The documentation's commands use relative paths or ``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT``, not ``/work/``."""
    pages = [REPOSITORY / "README.md", REPOSITORY / "RESULTS.md", *(REPOSITORY / "docs").rglob("*.md")]
    offending = [str(p.relative_to(REPOSITORY)) for p in pages if re.search(r"(?<![\w.])/work/", p.read_text())]
    assert not offending, f"absolute machine paths in {offending}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the nav exists and every link and cross-reference resolves."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


# A package for docs/sphinx_roles.py to rewrite (named apart from this repository's, which griffe would find first).
SPHINX_ROLES_PACKAGE = {
    "__init__.py": "from roles_example.core import Thing\n",
    "core.py": '''
class Thing:
    """Built by :func:`make`; see :meth:`run`, :class:`~roles_example.core.Thing` and :meth:`setup`.

    Its cost::

        ``g = a - b``
    """

    def run(self) -> None:
        """Calls :meth:`Thing.run`, holds ``nn.Parameter``\\\\ s."""


def make() -> Thing:
    """Returns a :class:`Thing`."""
''',
}


def test_sphinx_roles_become_autorefs_links() -> None:
    """docs/sphinx_roles.py: a qualified role is a checked link, a relative one a link where it resolves, else code."""
    griffe = pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("sphinx_roles", REPOSITORY / "docs" / "sphinx_roles.py")
    assert spec is not None and spec.loader is not None
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    extensions = griffe.load_extensions(roles.SphinxRoles)
    with griffe.temporary_visited_package("roles_example", SPHINX_ROLES_PACKAGE, extensions=extensions) as package:
        core = package.members["core"]
        thing, run, make = core.members["Thing"], core.members["Thing"].members["run"], core.members["make"]
        optional = '<autoref identifier="roles_example.core.{}" optional><code>{}</code></autoref>'
        assert thing.docstring.value == (
            f"Built by {optional.format('make', 'make')}; see {optional.format('Thing.run', 'run')}, "
            "[<code>Thing</code>][roles_example.core.Thing] and `setup`.\n\nIts cost:\n\n    g = a - b"
        )
        assert run.docstring.value == f"Calls {optional.format('Thing.run', 'Thing.run')}, holds ``nn.Parameter``s."
        assert make.docstring.value == f"Returns a {optional.format('Thing', 'Thing')}."
