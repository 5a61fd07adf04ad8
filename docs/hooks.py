"""MkDocs hooks of the documentation build (named in mkdocs.yml; not part of the package).

* ``<!-- readme: NAME -->`` on a docs page is replaced by the README's block between
  ``<!-- docs:start NAME -->`` and ``<!-- docs:end NAME -->``, its links to ``docs/…`` and ``tutorials/…``
  made relative to the page and ``\\|`` (GitHub's pipe in a table cell) unescaped: the README stays the one
  source of what it says.
* The tutorials live in ``tutorials/`` at the repository root, outside ``docs/``: :func:`on_files` adds
  them to the site as ``tutorials/*.ipynb`` before mkdocs-jupyter turns them into pages (from the outputs
  saved in the notebooks; nothing is executed).
* The docstrings are written with Sphinx roles (``:func:`fit```) and ``::`` before literal blocks;
  :func:`on_page_content` drops the role names and the doubled colon, which Markdown would print.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"^<!-- readme: ([\w-]+) -->$", re.M)
README_LINK = re.compile(r"(\]\()((?:docs|tutorials)/[^)\s]*)")
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):(<code>)~?")
LITERAL = re.compile(r"::(</p>)")


def readme_block(name: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"^<!-- docs:start {name} -->\n(.*?)\n<!-- docs:end {name} -->$", readme, re.M | re.S)
    if found is None:
        raise PluginError(
            f"README.md has no block {name!r}: <!-- docs:start {name} --> … <!-- docs:end {name} -->"
        )
    return found.group(1)


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri) or "."

    def relative(link):
        target = link.group(2).removeprefix("docs/")
        return link.group(1) + posixpath.relpath(target, page_dir)

    def include(found):
        # GitHub needs a pipe inside a table's code span escaped; Python-Markdown's tables skip code spans
        return README_LINK.sub(relative, readme_block(found.group(1))).replace("\\|", "|")

    return INCLUDE.sub(include, markdown)


@event_priority(100)  # before mkdocs-jupyter's on_files, which claims the notebooks
def on_files(files, config):
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        files.append(
            File(
                f"tutorials/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_content(html, page, config, files):
    return LITERAL.sub(r":\1", ROLE.sub(r"\1", html))
