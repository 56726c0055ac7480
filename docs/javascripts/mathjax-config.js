// MathJax 3 settings for the formulas that pymdownx.arithmatex (generic mode) emits:
// inline math as \( ... \) and display math as \[ ... \], each inside an element of
// class "arithmatex". Everything else on the page (code blocks included) is left alone.
// This file must load before javascripts/vendor/mathjax/tex-chtml.js (see mkdocs.yml).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// With Material's instant navigation a page is swapped in without reloading the
// scripts, and document$ emits the new document. Typeset whatever formulas are still
// raw then. The first page is typeset by MathJax's own start-up; touching it again
// here (clearing MathJax's caches, say) would drop the glyph styles it just wrote.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (!window.MathJax || typeof MathJax.typesetPromise !== "function") {
      return;
    }
    const raw = Array.from(document.querySelectorAll(".arithmatex")).filter(
      (el) => el.querySelector("mjx-container") === null,
    );
    if (raw.length > 0) {
      MathJax.texReset();
      MathJax.typesetPromise(raw);
    }
  });
}
