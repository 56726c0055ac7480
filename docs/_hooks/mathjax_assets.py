"""MkDocs hook: refuse to build a site whose formulas would not render.

The MathJax files are fetched at build time (``bash docs/fetch_assets.sh``) into an
ignored folder rather than committed; without them the pages would still build but
show raw TeX. This hook turns that into an error that says what to run.
"""

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError


_MATHJAX = Path("javascripts", "vendor", "mathjax", "tex-chtml.js")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    if not (Path(config.docs_dir) / _MATHJAX).is_file():
        raise PluginError(
            f"MathJax is missing ({Path(config.docs_dir) / _MATHJAX}); "
            "run `bash docs/fetch_assets.sh` (or `make docs`) first."
        )
    return config
