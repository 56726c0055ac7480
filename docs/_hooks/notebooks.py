"""MkDocs hook: show the executed notebooks of `notebooks/` as pages of the site.

Each `notebooks/NAME.ipynb` of the repository becomes the page `notebooks/NAME/`, as if
it were `docs/notebooks/NAME.md`:

- Markdown cells go through the site's own Markdown, so `$...$` and `$$...$$` formulas
  are typeset by the local MathJax like on every other page;
- code cells become highlighted Python blocks;
- the outputs stored in the notebook become text blocks and PNG images
  (`notebooks/NAME_files/`).

Nothing is executed and nothing is loaded from outside the site: the pages show what
the notebook file holds (to refresh them, run the notebook and store it with its
outputs, e.g. `jupyter execute --inplace`). The notebook itself is published next to
its page for download, and outputs get a style of their own (`notebooks.css`).
"""

import base64
import json
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


_DEST = "notebooks"  # where the pages go, relative to docs/
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Links written for Jupyter, relative to notebooks/: to the docs (`../docs/x.md`) and
# to another notebook (`name.ipynb#anchor`). On the site they point to the pages.
_DOCS_LINK = re.compile(r"\]\(\.\./docs/")
_NOTEBOOK_LINK = re.compile(r"\]\(([\w-]+)\.ipynb([#)])")


def _notebook_dir(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent / "notebooks"


def _text(source: str | list[str]) -> str:
    return "".join(source) if isinstance(source, list) else source


# Outputs look like code blocks; a style of their own sets them apart (see on_config).
_CSS = "stylesheets/notebooks.css"
_STYLE = """\
.md-typeset .nb-output pre > code {
  background-color: transparent;
  border-left: 0.2rem solid var(--md-default-fg-color--lighter);
}
/* Code cells wrap their long lines rather than hide them past the column's edge. */
.md-typeset .nb-code pre > code {
  white-space: pre-wrap;
  overflow-wrap: anywhere;
}
"""
# Notebook pages leave out the table of contents: their code and plots get its width.
_FRONT_MATTER = "---\nhide:\n  - toc\n---\n\n"


def _fence(text: str, lang: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{_ANSI.sub('', text).rstrip()}\n{fence}\n"


def _output(text: str) -> str:
    return _fence(text, "{.text .nb-output}")


def _outputs(
    outputs: list[dict], prefix: str, images: dict[str, bytes], name: str
) -> list[str]:
    """The Markdown of one cell's outputs; PNGs are added to `images`."""
    parts: list[str] = []
    stream: list[str] = []
    for number, output in enumerate(outputs):
        if output["output_type"] == "stream":
            stream.append(_text(output["text"]))
            continue
        if stream:
            parts.append(_output("".join(stream)))
            stream = []
        if output["output_type"] == "error":
            parts.append(_output("\n".join(output["traceback"])))
            continue
        data = output.get("data", {})
        if "image/png" in data:
            file = f"{prefix}_{number}.png"
            images[file] = base64.b64decode(_text(data["image/png"]))
            parts.append(f"![Output of the cell above]({name}_files/{file})\n")
        elif "text/markdown" in data:
            parts.append(_text(data["text/markdown"]).strip() + "\n")
        elif "text/plain" in data:
            parts.append(_output(_text(data["text/plain"])))
    if stream:
        parts.append(_output("".join(stream)))
    return parts


def render(notebook: dict, name: str) -> tuple[str, dict[str, bytes]]:
    """A notebook as one Markdown page, and the PNG files its page links to."""
    parts: list[str] = []
    images: dict[str, bytes] = {}
    for index, cell in enumerate(notebook["cells"]):
        source = _text(cell["source"]).strip()
        if cell["cell_type"] == "markdown":
            source = _DOCS_LINK.sub("](../", source)
            parts.append(_NOTEBOOK_LINK.sub(r"](\1.md\2", source) + "\n")
            if index == 0:
                parts.append(
                    f"*This page shows the notebook [`notebooks/{name}.ipynb`]"
                    f"({name}.ipynb) with the outputs stored in it.*\n"
                )
        elif cell["cell_type"] == "code":
            if source:
                parts.append(_fence(source, "{.python .nb-code}"))
            parts += _outputs(cell.get("outputs", []), f"cell{index}", images, name)
    return _FRONT_MATTER + "\n".join(parts), images


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    if _CSS not in config.extra_css:
        config.extra_css.append(_CSS)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, _CSS, content=_STYLE))
    folder = _notebook_dir(config)
    for path in sorted(folder.glob("*.ipynb")):
        try:
            notebook = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PluginError(f"cannot read the notebook {path}: {error}") from error
        page, images = render(notebook, path.stem)
        files.append(File.generated(config, f"{_DEST}/{path.stem}.md", content=page))
        files.append(
            File.generated(config, f"{_DEST}/{path.name}", abs_src_path=str(path))
        )
        for file, png in images.items():
            uri = f"{_DEST}/{path.stem}_files/{file}"
            files.append(File.generated(config, uri, content=png))
    return files


def on_serve(server, config: MkDocsConfig, builder):
    """`mkdocs serve` rebuilds when a notebook changes."""
    server.watch(str(_notebook_dir(config)))
    return server
