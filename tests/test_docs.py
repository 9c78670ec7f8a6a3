"""The documentation stays true: its code runs, its site builds, its links resolve and its math renders.

- Every Python block of every page in `docs/` and of `README.md` runs, page by page, in a fresh
  namespace with a temporary working directory.
- Every Python example in a public docstring runs on its own (the API reference shows them).
- The site builds with `mkdocs build --strict`; every internal link and anchor of the built site
  resolves; no page loads a script from another host (MathJax is bundled).
- In headless Chromium (skipped where it is not installed), every formula is typeset by MathJax and
  pages log nothing to the console.
"""

from __future__ import annotations

import html.parser
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
import types
import urllib.parse

import matplotlib
import pytest
import torch

import implicitlayers

matplotlib.use("Agg")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^[ \t]*```python\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
PAGES = sorted(p for p in [*DOCS.rglob("*.md"), ROOT / "README.md"] if BLOCK.search(p.read_text(encoding="utf-8")))

# Torch-internal warnings raised while the compatibility page runs: Dynamo reads `.grad` of non-leaf
# tensors while it wraps them (compiling a model), and forward-mode AD's first use scripts a helper
# with the deprecated `torch.jit.script` (torch.func.jvp).
DYNAMO_GRAD_WARNING = "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
JIT_SCRIPT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


def _run(blocks: list[str], where: str) -> None:
    """Run code blocks in order in one fresh namespace (a page's blocks build on each other)."""
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(textwrap.dedent(block), where, "exec"), namespace)  # noqa: S102 - the docs are ours


# ------------------------------------------------------------------------------------- pages
@pytest.mark.filterwarnings(DYNAMO_GRAD_WARNING)
@pytest.mark.filterwarnings(JIT_SCRIPT_WARNING)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_runs(page: pathlib.Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # pages import the examples' helpers (`from examples.jiio_digits import ...`)
    _run(BLOCK.findall(page.read_text(encoding="utf-8")), str(page))


def test_docs_and_readme_have_code() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert "README.md" in names, "the README's Python example is no longer found"
    assert {"docs/install.md", "docs/guides/declaring.md"} <= names


# ---------------------------------------------------------------------------- docstring examples
# Examples that are fragments (they use a `model`, `layer` or `x` the reader already has): listed
# here so that they are skipped knowingly, and so that a complete rewrite makes this list shrink.
FRAGMENTS: dict[str, str] = {}


def _public_modules() -> list[types.ModuleType]:
    modules = [implicitlayers]
    for info in pkgutil.walk_packages(implicitlayers.__path__, "implicitlayers."):
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError:  # an optional extra (e.g. Flower for `implicitlayers.federated`) is absent
            continue
    return modules


def _documented(module: types.ModuleType):
    """`(qualified name, docstring)` of the module, its classes and functions, and their methods."""
    yield module.__name__, module.__doc__ or ""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__ or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        yield f"{module.__name__}.{name}", inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attr}", inspect.getdoc(member) or ""


def _docstring_examples() -> dict[str, str]:
    examples = {}
    for module in _public_modules():
        for name, doc in _documented(module):
            for i, block in enumerate(BLOCK.findall(doc)):
                examples[f"{name}[{i}]" if i else name] = block
    return examples


EXAMPLES = _docstring_examples()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example_runs(name: str, tmp_path, monkeypatch) -> None:
    if name in FRAGMENTS:
        pytest.skip(f"fragment, not runnable on its own: {FRAGMENTS[name]}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # examples draw random data; a seed makes each run the same
    _run([EXAMPLES[name]], f"<docstring of {name}>")


def test_docstring_examples_are_found_and_the_fragment_list_is_current() -> None:
    assert {"implicitlayers.models.deq.DEQ", "implicitlayers.models.jiio.JIIO"} <= set(EXAMPLES)
    stale = sorted(set(FRAGMENTS) - set(EXAMPLES))
    assert not stale, f"FRAGMENTS names examples that no longer exist: {stale}"


# ---------------------------------------------------------------------------------- the site
class _Page(html.parser.HTMLParser):
    """Collects a built page's ids, links, script sources and formula elements."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.formulas = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.links.append(a["src"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "link" and a.get("rel") == "stylesheet" and a.get("href"):
            self.links.append(a["href"])
        if "arithmatex" in (a.get("class") or "").split():
            self.formulas += 1


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _built_pages(site: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def test_every_internal_link_and_anchor_of_the_site_resolves(site: pathlib.Path) -> None:
    parsed = {p: _parse(p) for p in _built_pages(site)}
    assert len(parsed) >= 15, sorted(str(p.relative_to(site)) for p in parsed)
    broken = []
    for page, info in parsed.items():
        for link in info.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc or link.startswith(("mailto:", "data:")):
                continue
            target = page if not url.path else (page.parent / urllib.parse.unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {link}")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if urllib.parse.unquote(url.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)} -> {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_page_loads_a_script_from_another_host(site: pathlib.Path) -> None:
    remote = [
        f"{p.relative_to(site)}: {src}" for p in _built_pages(site) for src in _parse(p).scripts
        if urllib.parse.urlsplit(src).netloc
    ]
    assert not remote, "scripts loaded from a CDN:\n" + "\n".join(remote)
    assert (site / "javascripts" / "mathjax-tex-svg.js").stat().st_size > 1_000_000


def test_the_api_reference_shows_public_names_and_signatures(site: pathlib.Path) -> None:
    page = (site / "api" / "solvers" / "index.html").read_text(encoding="utf-8")
    for name in ("implicitlayers.Anderson", "implicitlayers.Broyden", "implicitlayers.fixed_point"):
        assert f'id="{name}"' in page, f"no heading for {name}"
    # Headings (their anchors) and signatures name public paths; a link's tooltip (title="...") may
    # still name the module that defines the object.
    private = re.compile(r"implicitlayers(\.\w+)*\._\w+")
    anchors = [a for a in re.findall(r'id="(implicitlayers[^"]*)"', page) if private.search(a)]
    signatures = re.sub(r'title="[^"]*"', "", " ".join(re.findall(r'class="doc-signature.*?</code>', page, re.DOTALL)))
    assert not anchors and not private.search(signatures), f"private paths shown: {anchors}"
    assert page.count('class="doc-signature') >= 8, "signatures are missing"


def test_the_benchmark_figures_are_drawn_from_the_tables(tmp_path) -> None:
    script = DOCS / "assets" / "benchmarks" / "make_plots.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    shown = sorted(re.findall(r"assets/benchmarks/(\w+\.png)", (DOCS / "benchmarks.md").read_text(encoding="utf-8")))
    assert drawn == shown and all((tmp_path / n).stat().st_size > 10_000 for n in drawn), (drawn, shown)


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_math_renders_and_pages_log_nothing_in_a_browser(site: pathlib.Path, tmp_path) -> None:
    with_math = [p for p in _built_pages(site) if _parse(p).formulas]
    assert any("tutorials/deq" in p.as_posix() for p in with_math), "no page with formulas was found"
    for page in [*with_math, site / "index.html", site / "api" / "solvers" / "index.html"]:
        result = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        where = page.relative_to(site)
        assert result.returncode == 0, f"{where}: chromium failed: {result.stderr[-2000:]}"
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, f"{where}: console output:\n" + "\n".join(console)
        dom = result.stdout
        formulas = re.findall(r'<(?:div|span) class="arithmatex">(.{0,40})', dom, re.DOTALL)
        raw = [f for f in formulas if not f.startswith("<mjx-container")]
        assert not raw, f"{where}: formulas left as raw TeX: {raw[:3]}"
        assert len(formulas) == _parse(page).formulas, f"{where}: {len(formulas)} of {_parse(page).formulas} formulas found"
