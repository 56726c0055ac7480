"""Checks of the documentation site (mkdocs.yml, docs/).

- The API reference lists every public name of `bioflax_eqx`, and nothing else.
- The ```python examples of each page run, and every `bfx.NAME` they use exists.
- With BIOFLAX_EQX_DOCS=1 and mkdocs installed: `mkdocs build --strict` succeeds and
  the site loads nothing from outside itself.
- With, in addition, Chromium at /usr/bin/chromium: the theory pages, served on
  loopback, come out with every formula typeset by MathJax and its fonts loaded from
  the site.
"""

import functools
import html.parser
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import threading
import types
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import jax
import pytest

import bioflax_eqx


ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
THEORY_PAGES = ["theory/fa/", "theory/kp/", "theory/dfa/", "theory/sign_symmetry/"]

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_API_ENTRY = re.compile(r"^:::[ \t]+(bioflax_eqx(?:\.\w+)+)[ \t]*$", re.MULTILINE)
_PY_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_PKG_REF = re.compile(r"\b(?:bfx|bioflax_eqx)\.([A-Za-z_]\w*)")
_CSS_EXTERNAL = re.compile(
    r"(?:url\(\s*['\"]?|@import\s+['\"])((?:https?:)?//[^)'\"]+)"
)


def _markdown(path: pathlib.Path) -> str:
    """A page's Markdown with HTML comments (commented-out entries, TODOs) removed."""
    return _COMMENT.sub("", path.read_text(encoding="utf-8"))


def _api_pages() -> list[pathlib.Path]:
    pages = sorted((DOCS / "api").rglob("*.md")) if (DOCS / "api").is_dir() else []
    if (DOCS / "api.md").is_file():
        pages.insert(0, DOCS / "api.md")
    return pages


def _documented_paths() -> list[str]:
    return [m for page in _api_pages() for m in _API_ENTRY.findall(_markdown(page))]


def _public_names(module: types.ModuleType) -> set[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name in dir(module)
            if not name.startswith("_")
            and not isinstance(getattr(module, name), types.ModuleType)
        ]
    return set(names)


# --------------------------------------------------------------------------- API pages


def test_api_pages_exist():
    assert _api_pages(), "no docs/api.md or docs/api/*.md"
    assert _documented_paths(), "the API pages have no `::: bioflax_eqx.NAME` entry"


def test_api_pages_document_every_public_name():
    module = bioflax_eqx
    documented = {path.split(".")[1] for path in _documented_paths()}
    missing = sorted(_public_names(module) - documented)
    assert not missing, (
        f"public names without a `::: bioflax_eqx.NAME` entry in docs/api*: {missing}"
    )


def test_api_entries_name_public_objects():
    module = bioflax_eqx
    public = _public_names(module)
    wrong = []
    for path in _documented_paths():
        parts = path.split(".")[1:]
        obj: object = module
        for part in parts:
            obj = getattr(obj, part, None)
        if parts[0] not in public or obj is None:
            wrong.append(path)
    assert not wrong, f"API entries that are not public objects of bioflax_eqx: {wrong}"


# -------------------------------------------------------------------- runnable examples


def _pages_with_examples() -> list[pathlib.Path]:
    pages = [DOCS.parent / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [page for page in pages if _PY_BLOCK.search(_markdown(page))]


@pytest.mark.parametrize(
    "page", _pages_with_examples(), ids=lambda p: str(p.relative_to(DOCS.parent))
)
def test_python_examples_run(page: pathlib.Path):
    """Each page's ```python blocks run in order, in one namespace per page."""
    module = bioflax_eqx
    blocks = _PY_BLOCK.findall(_markdown(page))
    used = {name for block in blocks for name in _PKG_REF.findall(block)}
    absent = sorted(name for name in used if not hasattr(module, name))
    # A failure, not a skip: a renamed export must not silence its examples.
    assert not absent, f"{page.name} uses names bioflax_eqx does not export: {absent}"
    namespace: dict[str, object] = {"__name__": f"docs_example_{page.stem}"}
    # The examples are user code, run with JAX's default dtype promotion: optax's Adam
    # bias correction, for one, mixes a float with an int32 step count.
    with jax.numpy_dtype_promotion("standard"):
        for number, block in enumerate(blocks, start=1):
            name = f"{page.relative_to(ROOT)} (block {number})"
            exec(compile(block, name, "exec"), namespace)


def test_an_example_using_a_missing_name_fails(tmp_path: pathlib.Path):
    page = tmp_path / "page.md"
    page.write_text("```python\nimport bioflax_eqx as bfx\nbfx.no_such_name\n```\n")
    with pytest.raises(AssertionError, match=r"does not export: \['no_such_name'\]"):
        test_python_examples_run(page)


# ------------------------------------------------------------------------ strict build


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The site built by `mkdocs build --strict`, in a temporary folder."""
    if os.environ.get("BIOFLAX_EQX_DOCS") != "1":
        pytest.skip("set BIOFLAX_EQX_DOCS=1 to build the documentation")
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (the `docs` extra)")
    site_dir = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"mkdocs build --strict failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return site_dir


def test_strict_build_makes_every_page(site: pathlib.Path):
    for page in ["", *THEORY_PAGES, "guide/", "training/", "notebooks/", "results/"]:
        assert (site / page / "index.html").is_file(), page
    assert (site / "api" / "index.html").is_file()
    assert (site / "javascripts/vendor/mathjax/tex-chtml.js").is_file()
    fonts = site / "javascripts/vendor/mathjax/output/chtml/fonts/woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file()


class _ExternalRefs(html.parser.HTMLParser):
    """Collects resources a page would load from another host (links are fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video"):
            url = values.get("src")
        elif tag == "link" and (values.get("rel") or "") != "canonical":
            url = values.get("href")
        else:
            return
        if url and re.match(r"^(?:[a-z]+:)?//", url, re.IGNORECASE):
            self.refs.append(f"<{tag}> {url}")


def test_site_loads_nothing_from_outside(site: pathlib.Path):
    found = []
    for page in site.rglob("*.html"):
        parser = _ExternalRefs()
        parser.feed(page.read_text(encoding="utf-8"))
        found += [f"{page.relative_to(site)}: {ref}" for ref in parser.refs]
    for sheet in site.rglob("*.css"):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        for m in _CSS_EXTERNAL.finditer(text):
            found.append(f"{sheet.relative_to(site)}: {m.group(1)}")
    assert not found, "external resources:\n" + "\n".join(found)


# ---------------------------------------------------------------- rendering in Chromium


class _MathOnPage(html.parser.HTMLParser):
    """For each `arithmatex` element: its text, and whether MathJax output is inside."""

    _VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self) -> None:
        super().__init__()
        self.formulas: list[tuple[str, bool]] = []
        self._depth = 0
        self._text: list[str] = []
        self._typeset = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._VOID:
            return
        if self._depth:
            self._depth += 1
            self._typeset |= tag == "mjx-container"
        elif "arithmatex" in (dict(attrs).get("class") or "").split():
            self._depth, self._text, self._typeset = 1, [], False

    def handle_endtag(self, tag: str) -> None:
        if self._depth and tag not in self._VOID:
            self._depth -= 1
            if not self._depth:
                self.formulas.append(("".join(self._text), self._typeset))

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._text.append(data)


@pytest.fixture(scope="module")
def served_site(site: pathlib.Path):
    """The built site on a loopback port; yields (base URL, list of (path, status))."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`)")
    requests: list[tuple[str, int]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            requests.append((self.path, int(code)))

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _dump_dom(url: str, profile: pathlib.Path) -> str:
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            # Nothing but the loopback server may be reached from the page.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("page", THEORY_PAGES)
def test_theory_page_math_renders(served_site, page: str, tmp_path: pathlib.Path):
    base, requests = served_site
    start = len(requests)
    dom = _dump_dom(base + page, tmp_path / "profile")
    parser = _MathOnPage()
    parser.feed(dom)
    assert len(parser.formulas) >= 5, f"too few formulas found on {page}"
    raw = [text for text, typeset in parser.formulas if not typeset]
    assert not raw, f"{len(raw)} formulas not typeset on {page}, e.g. {raw[:3]}"
    leftover = [t for t, _ in parser.formulas if re.search(r"\\[(\[]|\\[)\]]", t)]
    assert not leftover, f"raw TeX delimiters left on {page}: {leftover[:3]}"

    seen = requests[start:]
    failed = [(path, code) for path, code in seen if code >= 400]
    assert not failed, f"requests that failed while rendering {page}: {failed}"
    fonts = {pathlib.PurePosixPath(path).name for path, code in seen if code == 200}
    assert fonts & {"MathJax_Main-Regular.woff", "MathJax_Math-Italic.woff"}, (
        f"MathJax's fonts were not loaded from the site for {page}: {sorted(fonts)}"
    )
