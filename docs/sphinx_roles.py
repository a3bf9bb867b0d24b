"""A Griffe extension that turns the docstrings' Sphinx roles into mkdocs-autorefs cross-references.

The package's docstrings are Google style with Sphinx roles (``:class:`~lightning_contrastive.Contrastive```,
``:func:`estimate```, ``:meth:`adapt```), which mkdocstrings-python does not read. Before the docstrings are parsed,
this extension rewrites each role into a cross-reference that mkdocs-autorefs resolves, and turns reST's ``::``
literal-block marker into a colon (the indented block after it is already a Markdown code block, so the double
backticks of an indented equation line go too):

- a fully qualified target (any path in the documented package, ``lightning_contrastive.…``) becomes a required
  reference, ``[`Contrastive`][path]``: a target missing from the API reference fails ``mkdocs build --strict``, as
  a broken link should;
- a relative target (``adapt``, ``MetaLearningModule.test_step``) is looked up the way Sphinx does, from the
  documented object outwards through its class and module; when found, it becomes an *optional* reference to the
  object's canonical path (a link where that object is rendered, plain code where it is internal), and when not
  found (a Lightning hook such as ``setup``) it stays plain code.

``~`` shows only the last component, as in Sphinx. Loaded by mkdocs.yml (``extensions: [docs/sphinx_roles.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc|const):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`"
)
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)
# An indented line after a blank one that opens with an inline literal is reST's block-quoted equation; Markdown
# shows it as a code block already, where the ``...`` would be printed, so its double backticks go.
QUOTED_LITERAL = re.compile(r"(?<=\n\n)(?P<indent> {4,})(?P<line>``.*)$", re.MULTILINE)
ESCAPED_SPACE = re.compile(r"(?<=`)\\ ")  # reST's ``nn.Parameter``\ s: the code span and the plural's s, joined


def lookup(package: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    """The object at dotted ``path`` in ``package``'s tree, or ``None`` (other packages are never looked into)."""
    head, _, rest = path.partition(".")
    if head != package.name:
        return None
    if not rest:
        return package
    try:
        return package[rest]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def canonical(found: griffe.Object | griffe.Alias) -> str:
    """Where ``found`` is defined (an alias's target), the path its rendered heading is also registered under."""
    try:
        return found.canonical_path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return found.path


def scopes(obj: griffe.Object | griffe.Alias) -> list[str]:
    """The paths a relative target is looked up in, innermost first: the object (if it has members), its parents."""
    chain = []
    current: Any = obj if obj.is_class or obj.is_module else obj.parent
    while current is not None:
        chain.append(current.path)
        current = current.parent
    return chain


def rewrite(text: str, obj: griffe.Object | griffe.Alias, package: griffe.Module) -> str:
    """``text`` with each Sphinx role replaced by an autorefs reference and each ``::`` by ``:``."""

    def replace(match: re.Match[str]) -> str:
        target = match["target"]
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        code = f"<code>{title}</code>"
        if target.split(".", 1)[0] == package.name:
            return f"[{code}][{target}]"
        for scope in scopes(obj):
            found = lookup(package, f"{scope}.{target}")
            if found is not None:
                return f'<autoref identifier="{canonical(found)}" optional>{code}</autoref>'
        return f"`{title}`"

    text = QUOTED_LITERAL.sub(lambda m: m["indent"] + m["line"].replace("``", ""), text)
    return ESCAPED_SPACE.sub("", LITERAL_BLOCK.sub(":", ROLE.sub(replace, text)))


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package once its whole tree is known (relative targets need it)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Visit ``pkg`` and every object below it that has a docstring of its own (aliases share their target's)."""
        pending: list[griffe.Object] = [pkg]
        while pending:
            obj = pending.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj, pkg)
            pending.extend(member for member in obj.members.values() if not member.is_alias)
