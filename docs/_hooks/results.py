"""MkDocs hook: show the result files of the repository on the Results page.

`results/*.md` and `benchmarks/results.md` are written by the scripts that measure
them; the page includes them where it says `<!-- include PATH -->` (PATH relative to
the repository root), one heading level down, so the site never holds a stale copy.
"""

import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page


_INCLUDE = re.compile(r"^<!-- include (\S+) -->$", re.MULTILINE)


def on_page_markdown(
    markdown: str, *, page: Page, config: MkDocsConfig, files: Files
) -> str:
    root = Path(config.config_file_path).resolve().parent

    def include(match: re.Match[str]) -> str:
        path = root / match.group(1)
        if not path.is_file():
            raise PluginError(f"{page.file.src_path} includes {path}, which is missing")
        text = re.sub(r"^#", "##", path.read_text(), flags=re.MULTILINE)
        # Figures live in docs/: linked from results/ as ../docs/..., from the page
        # (docs/results.md) as they are.
        return text.replace("](../docs/", "](")

    return _INCLUDE.sub(include, markdown)
