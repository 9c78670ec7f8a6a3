// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only the spans and divs that
// arithmatex marks, with the \( \) and \[ \] delimiters it writes. Loaded before the bundled
// mathjax-tex-svg.js (MathJax 3.2.2, SVG output: fonts are inside the script, nothing is fetched).
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
