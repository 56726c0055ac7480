#!/usr/bin/env bash
# Put MathJax where the documentation site loads it from, so that formulas render
# with no network at view time (no CDN).
#
# The files come from the npm registry's `mathjax` package, fetched with `npm pack`
# and checked against a pinned SHA-512 before anything is unpacked. They land in
# docs/javascripts/vendor/mathjax/, which docs/.gitignore keeps out of git.
#
# Usage: bash docs/fetch_assets.sh            (idempotent; a no-op when up to date)
#        MATHJAX_TARBALL=/path/mathjax-3.2.2.tgz bash docs/fetch_assets.sh
#                                             (use a tarball you already have)
set -euo pipefail

MATHJAX_VERSION="3.2.2"
MATHJAX_SHA512="06df9249553c7811b6ef30a155ec0e89c62ced7b1db78d2a9b8f94a47c97ee4d3f3bd36588f73ec7bee4d7f144b0fb2328f64626fb5164cd6f3be81e5b43a11b"

docs_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${docs_dir}/javascripts/vendor/mathjax"
stamp="${dest}/.version"

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${MATHJAX_VERSION}" \
      && -f "${dest}/tex-chtml.js" ]]; then
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

if [[ -n "${MATHJAX_TARBALL:-}" ]]; then
    cp "${MATHJAX_TARBALL}" "${work}/mathjax.tgz"
else
    if ! command -v npm >/dev/null 2>&1; then
        echo "fetch_assets.sh: npm is needed to fetch MathJax (or set MATHJAX_TARBALL)" >&2
        exit 1
    fi
    (cd "${work}" && npm pack --silent "mathjax@${MATHJAX_VERSION}" >/dev/null)
    mv "${work}/mathjax-${MATHJAX_VERSION}.tgz" "${work}/mathjax.tgz"
fi

actual="$(sha512sum "${work}/mathjax.tgz" | cut -d' ' -f1)"
if [[ "${actual}" != "${MATHJAX_SHA512}" ]]; then
    echo "fetch_assets.sh: mathjax-${MATHJAX_VERSION}.tgz has SHA-512 ${actual}," >&2
    echo "  expected ${MATHJAX_SHA512}" >&2
    exit 1
fi

tar -xzf "${work}/mathjax.tgz" -C "${work}"
es5="${work}/package/es5"

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
cp "${work}/package/LICENSE" "${dest}/LICENSE"
echo "${MATHJAX_VERSION}" > "${stamp}"
echo "fetch_assets.sh: MathJax ${MATHJAX_VERSION} in ${dest#"${docs_dir}"/}"
