#!/usr/bin/env bash
# Put MathJax where the documentation site loads it from, so that formulas render
# with no network at view time (no CDN).
#
# The files come from the Python package `django-static-mathjax` (MathJax's own
# build, packaged as static files; nothing of Django is used or needed), pinned in
# the `docs` extra of pyproject.toml, so `pip install -e ".[docs]"` brings them and
# no other tool is needed. The bundle's SHA-256 is checked before anything is copied.
# They land in docs/javascripts/vendor/mathjax/, which docs/.gitignore keeps out of
# git.
#
# Usage: bash docs/fetch_assets.sh     (idempotent; a no-op when up to date)
#        PYTHON=path/to/python bash docs/fetch_assets.sh
#                                      (the Python that has the package; default:
#                                      .venv/bin/python if there, else python3)
set -euo pipefail

PACKAGE="django-static-mathjax 3.2.2.1"  # MathJax 3.2.2
TEX_CHTML_SHA256="9b5ae004241a76ab35468a2b8cc567774cfd919f3788c29de17dc1fba95bbe06"

docs_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${docs_dir}/javascripts/vendor/mathjax"
stamp="${dest}/.version"

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${PACKAGE}" \
      && -f "${dest}/tex-chtml.js" ]]; then
    exit 0
fi

default_python="${docs_dir}/../.venv/bin/python"
[[ -x "${default_python}" ]] || default_python=python3
python="${PYTHON:-${default_python}}"
# Found without importing it: its folder, with MathJax under static/mathjax/.
if ! package_dir="$("${python}" -c 'import importlib.util as u
s = u.find_spec("mathjax")
print(s.submodule_search_locations[0] if s and s.submodule_search_locations else "")')" \
    || [[ -z "${package_dir}" ]]; then
    echo "fetch_assets.sh: ${python} lacks MathJax: pip install -e \".[docs]\"" >&2
    echo "  (the docs extra pins ${PACKAGE}), or set PYTHON to one that has it" >&2
    exit 1
fi
es5="${package_dir}/static/mathjax/es5"

actual="$(sha256sum "${es5}/tex-chtml.js" 2>/dev/null | cut -d' ' -f1 || true)"
if [[ "${actual}" != "${TEX_CHTML_SHA256}" ]]; then
    echo "fetch_assets.sh: ${es5}/tex-chtml.js has SHA-256 '${actual}'," >&2
    echo "  expected ${TEX_CHTML_SHA256} (${PACKAGE})" >&2
    exit 1
fi

# The single-file TeX-to-CommonHTML component, plus what it loads lazily at run
# time, relative to its own location: TeX extensions (\boldsymbol and friends via
# autoload), the CommonHTML woff fonts, the context menu and its accessibility
# tools. Other combined components (SVG output, MathML input) are left out.
rm -rf "${dest}"
mkdir -p "${dest}/input/tex" "${dest}/output/chtml/fonts"
cp "${es5}/tex-chtml.js" "${dest}/"
cp -R "${es5}/input/tex/extensions" "${dest}/input/tex/"
cp -R "${es5}/output/chtml/fonts/woff-v2" "${dest}/output/chtml/fonts/"
cp -R "${es5}/ui" "${es5}/a11y" "${es5}/sre" "${dest}/"
cp "${package_dir}/static/mathjax/LICENSE" "${dest}/LICENSE"
echo "${PACKAGE}" > "${stamp}"
echo "fetch_assets.sh: MathJax from ${PACKAGE} in ${dest#"${docs_dir}"/}"
