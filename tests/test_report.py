"""`dgex report`: the run's self-contained HTML page, on a synthetic results tree written by dgex's own writers.

The tree (tables, figures, S2/S3 stand-ins) comes from the fake grid of test_tables.py through
`dgex aggregate | tables | figures`; expected numbers are read from the CSV files and formatted here
independently of dgex. The browser test opens the page in headless Chromium (Debian's `chromium`) and
reads what the browser rendered: the visible text (``innerText``) and every image's decoded width.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from conftest import assert_one_line_error, run_dgex
from dgex.aggregate import aggregate
from dgex.figures import make_figures
from dgex.report import make_report, markdown_html, render
from dgex.tables import PAPER, make_tables
from test_tables import make_grid

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


# --------------------------------------------------------------------------- the synthetic results tree
def _png(path: Path, label: str) -> None:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    ax.set_title(label)
    fig.savefig(path, dpi=60)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)


def _interpret(run: Path) -> None:
    """Stand-ins for `dgex interpret s2|s3` outputs: the files and captions the report reads."""
    for key in ("s2", "s3"):
        folder = run / "interpret" / key
        folder.mkdir(parents=True)
        _png(folder / f"figure_{key}.png", key)
        captions = {f"figure_{key}": f"Supplementary Figure {key.upper()}. Caption of {key} (k = 4)."}
        if key == "s2":
            pd.DataFrame({"representation": ["input", "hidden1"], "mean": [0.71234, 0.85678]}).to_csv(
                folder / "s2_summary.csv", index=False
            )
            captions["s2_summary"] = "Mean adjusted R² per representation."
        (folder / f"{key}.json").write_text(json.dumps({"analysis": key.upper(), "captions": captions}))


def _build(root: Path, *, paper_reference=False, drop_part=False, figures=True) -> Path:
    """A run folder (tables/, figures/, interpret/, aggregate/) like results/<name>/ after the workflow."""
    run = root / "run"
    dgex_dirs, base_dirs, _ = make_grid(root / "runs")
    if drop_part:  # one grid point lacks a target part: an incomplete grid
        dgex_dirs = [d for d in dgex_dirs if not (d.parent.name == "1x10_d0" and d.name == "part1")]
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=run / "aggregate", allow_incomplete=drop_part)
    make_tables(aggregate=run / "aggregate", output_dir=run / "tables", paper_reference=paper_reference, n_boot=20)
    if figures:  # the slowest part: only where a test looks at figures
        make_figures(aggregate=run / "aggregate", output_dir=run / "figures")
        _interpret(run)
    return run


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("report"))


@pytest.fixture
def run(tree, tmp_path):
    """A private copy of the tree, free to change."""
    return Path(shutil.copytree(tree, tmp_path / "run"))


class _Page(HTMLParser):
    """What a page holds: its text per element id, images (src, alt), links, and all text."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text, self.cells, self._open = [], [], [], [], []
        self.tags = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a)
        if tag == "a":
            self.links.append(a.get("href"))
        if tag in ("td", "th"):
            self._open.append([])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._open:
            self.cells.append("".join(self._open.pop()).strip())

    def handle_data(self, data):
        self.text.append(data)
        for cell in self._open:
            cell.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.all_text = re.sub(r"\s+", " ", "".join(p.text))
    return p


def _paper_fmt(mean: float, std: float | None = None) -> str:
    """The paper's '.3421 ± .0912', written here independently of dgex.tables.fmt."""
    one = lambda v: f"{v:.4f}".replace("0.", ".", 1)  # noqa: E731
    return one(mean) if std is None else f"{one(mean)} ± {one(std)}"


def _table1_numbers(run: Path) -> list[str]:
    t = pd.read_csv(run / "tables" / "table1.csv")
    return [_paper_fmt(m, s) for m, s in zip(t["mae_mean"], t["mae_std"], strict=True)]


def _section(page: str, start_id: str) -> str:
    """The HTML from the element with ``id=start_id`` up to the next table block or heading."""
    i = page.index(f'id="{start_id}"')
    ends = [j for j in (page.find('<div class="table"', i + 1), page.find("<h2", i + 1)) if j > 0]
    return page[i : min(ends) if ends else len(page)]


# --------------------------------------------------------------------------- content
def test_every_table_figure_and_caption_is_in_the_page(run):
    out = make_report(results_dir=run, name="synthetic")
    page = out.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert out == run / "report.html"
    # every table of tables.json inline, as a table, with its CSV linked
    tables = json.loads((run / "tables" / "tables.json").read_text())
    for name in tables["tables"]:
        block = _section(page, name)
        assert "<table>" in block and f'href="tables/{name}.csv"' in block
    # Table 1's numbers, each in a cell of Table 1's section
    cells = _parse(_section(page, "table1")).cells
    for number in _table1_numbers(run):
        assert any(number in c for c in cells), number
    # every figure: its PNG embedded byte for byte, its computed caption, its PDF linked
    figures = json.loads((run / "figures" / "figures.json").read_text())["figures"]
    embedded = [base64.b64decode(i["src"].split(",", 1)[1]) for i in parsed.images]
    pngs = [run / "figures" / f"{n}.png" for n in figures] + [
        run / "interpret" / k / f"figure_{k}.png" for k in ("s2", "s3")
    ]
    assert embedded == [p.read_bytes() for p in pngs]
    for name, fig in figures.items():
        assert re.sub(r"\s+", " ", fig["caption"]) in parsed.all_text
        assert f"figures/{name}.pdf" in parsed.links
    for key in ("s2", "s3"):
        assert f"Caption of {key} (k = 4)." in parsed.all_text
        assert f"interpret/{key}/figure_{key}.pdf" in parsed.links
    assert "0.7123" in parsed.cells  # S2's summary table, to 4 significant digits
    # the run summary: name, grid of the aggregate, the version
    assert "synthetic" in parsed.all_text and "units: 10, 20" in parsed.all_text
    # offline and printable: no script, no external resource
    assert "script" not in parsed.tags and not re.search(r'(src|href)="(https?:)?//', page)
    assert "Incomplete" not in parsed.all_text and "External test sets" not in parsed.all_text
    assert all((run / href).is_file() for href in parsed.links)


def test_the_summary_describes_the_data_and_says_when_it_is_synthetic(run):
    (run / "data").mkdir()
    dataset = {
        # a GEO-only run (real.yaml) has no RNA-seq inputs: null in dataset.json
        "inputs": {"geo": str(run / "demo" / "geo.gctx"), "1000g": None, "gtex": None},
        "geo_profiles_kept": 1234,
        "genes": {"landmarks": 943, "targets": 77, "parts": {"0": 40, "1": 37}},
        "splits": {"geo-tr": 1000, "geo-va": 117},
    }
    (run / "data" / "dataset.json").write_text(json.dumps(dataset))
    text = _parse(render(run)).all_text
    assert "1234 GEO profiles kept" in text and "943 landmark and 77 target genes in 2 parts" in text
    assert "geo-tr 1000, geo-va 117" in text and "SYNTHETIC" not in text
    (run / "demo").mkdir()
    (run / "demo" / "demo.json").write_text(json.dumps({"files": {"geo": "geo.gctx"}}))
    assert "SYNTHETIC demo data" in _parse(render(run)).all_text


def test_links_are_relative_to_where_the_page_is_written(run, tmp_path):
    out = make_report(results_dir=run, output=tmp_path / "elsewhere" / "page.html")
    links = _parse(out.read_text(encoding="utf-8")).links
    assert links and all((out.parent / href).resolve().is_file() for href in links)


def test_paper_numbers_stand_beside_ours_only_where_configured(tmp_path, tree):
    with_paper = _parse(render(_build(tmp_path, paper_reference=True, figures=False)))
    without = _parse(render(tree))
    for method in ("LR", "KNN-GE"):
        paper = _paper_fmt(PAPER["geo"][method])
        row = with_paper.cells.index(method)  # first occurrence: Table 1's baseline rows
        assert paper in with_paper.cells[row : row + 4], (method, with_paper.cells[row : row + 4])
        assert paper not in without.cells
    assert "paper" in with_paper.cells and "paper" not in without.cells


def test_incomplete_runs_are_stated(tmp_path):
    run = _build(tmp_path, drop_part=True, figures=False)
    note = json.loads((run / "tables" / "tables.json").read_text())["incomplete"]["note"]
    page = render(run)
    assert '<div class="incomplete"' in page
    text = _parse(page).all_text
    assert "Incomplete (aggregated with --allow-incomplete)" in text and "1x10 dropout 0" in note
    assert re.sub(r"\*\*", "", note) in text  # the note, its Markdown bold rendered


def test_text_from_the_results_is_escaped(run):
    info = json.loads((run / "figures" / "figures.json").read_text())
    info["figures"]["figure2"]["caption"] = HOSTILE
    (run / "figures" / "figures.json").write_text(json.dumps(info))
    page = render(run, name=HOSTILE)
    assert "<script" not in page and "onerror=alert" not in page.replace("&lt;img src=x onerror=alert", "")
    parsed = _parse(page)
    assert HOSTILE in parsed.all_text  # shown as the text it is
    assert [i for i in parsed.images if i["src"] == "x"] == []


def test_markdown_subset():
    out = markdown_html("**Table 1.** a < b\nsecond line\n\n| h1 | h2 |\n|---|---|\n| <u>**.1 ± .2**</u> | `x` |\n")
    assert "<strong>Table 1.</strong> a &lt; b<br>" in out
    assert "<th>h1</th><th>h2</th>" in out and "---" not in out
    assert "<td><u><strong>.1 ± .2</strong></u></td><td><code>x</code></td>" in out
    assert "<script>" not in markdown_html("<script>x</script> <u>y</u>")


# --------------------------------------------------------------------------- external test sets
def _test_sets(run: Path, entries) -> None:
    (run / "tables" / "test_sets.json").write_text(json.dumps({"test_sets": entries}))


def test_external_test_sets_render_what_test_sets_json_lists(run):
    pd.DataFrame({"method": ["LR-L2", "D-GEX"], "mae_mean": [0.512345, 0.487654]}).to_csv(
        run / "tables" / "test_set_gse.csv", index=False
    )
    _png(run / "figures" / "test_set_gse_scatter.png", "gse")
    _test_sets(
        run,
        [
            {
                "name": "GSE<92743>",
                "caption": "D-GEX 2x20 vs LR-L2: lower MAE on 54% of genes, p = 0.03.",
                "table": "tables/test_set_gse.csv",
                "figures": [
                    {
                        "png": "figures/test_set_gse_scatter.png",
                        "pdf": "figures/test_set_gse_scatter.pdf",
                        "caption": "Per-gene MAE, D-GEX vs LR-L2.",
                    }
                ],
            }
        ],
    )
    page = render(run)
    parsed = _parse(page)
    section = page[page.index('id="test-sets"') :]
    assert "External test sets" in parsed.all_text and "GSE&lt;92743&gt;" in section
    assert "lower MAE on 54% of genes, p = 0.03." in parsed.all_text
    assert {"LR-L2", "0.5123", "0.4877"} <= set(parsed.cells)
    assert "Per-gene MAE, D-GEX vs LR-L2." in parsed.all_text
    assert parsed.images[-1]["src"].endswith(
        base64.b64encode((run / "figures" / "test_set_gse_scatter.png").read_bytes()).decode()
    )
    assert "figures/test_set_gse_scatter.pdf" in parsed.links


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"name": "a", "caption": "", "table": "../../etc/passwd"}, "not a path relative to the run folder"),
        ({"name": "a", "caption": "", "table": "/etc/passwd"}, "not a path relative to the run folder"),
        ({"name": "a", "caption": "", "table": "tables/none.csv"}, "does not exist"),
        ({"caption": "no name"}, "test_sets[0] has no 'name'"),
    ],
)
def test_bad_test_sets_json_is_one_line_error_and_no_page(run, entry, fragment):
    _test_sets(run, [entry])
    res = run_dgex("report", "--results-dir", run)
    assert_one_line_error(res, str(run / "tables" / "test_sets.json"), fragment)
    assert not (run / "report.html").exists()


# --------------------------------------------------------------------------- bad input
def test_a_folder_without_tables_is_one_line_error(tmp_path):
    res = run_dgex("report", "--results-dir", tmp_path)
    assert_one_line_error(res, str(tmp_path / "tables" / "tables.json"), "run the workflow")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_incomplete_figures_json_is_one_line_error(run):
    (run / "figures" / "figure3.png").unlink()
    res = run_dgex("report", "--results-dir", run)
    assert_one_line_error(res, str(run / "figures" / "figures.json"), "figure3.png", "does not exist")
    (run / "figures" / "figures.json").write_text("{not json")
    res = run_dgex("report", "--results-dir", run)
    assert_one_line_error(res, str(run / "figures" / "figures.json"), "cannot be read as JSON")
    (run / "figures" / "figures.json").write_text('{"figures": ["figure1.png"]}')  # JSON, but not figures.json's
    res = run_dgex("report", "--results-dir", run)
    assert_one_line_error(res, str(run), "figures/figures.json", "unexpected content")
    assert not (run / "report.html").exists()


def test_an_unwritable_output_is_one_line_error(run):
    (run / "report.html").mkdir()
    res = run_dgex("report", "--results-dir", run)
    assert_one_line_error(res, str(run / "report.html"))
    assert (run / "report.html").is_dir() and list((run / "report.html").iterdir()) == []


# --------------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


#: Injected into a copy of the page (the report itself has no script): after load, what the browser shows.
PROBE = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre"); out.id = "dgex-probe";
  out.textContent = JSON.stringify({text: document.body.innerText, images: [...document.images].map(
    i => ({complete: i.complete, width: i.naturalWidth, shown: i.getBoundingClientRect().width}))});
  document.body.appendChild(out);
});</script>"""


def _in_browser(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium; returns its visible text and each image's decoded and shown width."""
    browser = _chromium()
    probe = tmp_path / "probed.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    res = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="dgex-probe">(.*?)</pre>', res.stdout, re.S)
    assert found, f"chromium exit {res.returncode}: {res.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)


@needs_chromium
def test_chromium_shows_table1_and_every_figure(run, tmp_path):
    page = make_report(results_dir=run)
    seen = _in_browser(page, tmp_path)
    text = re.sub(r"\s+", " ", seen["text"])
    for number in _table1_numbers(run):
        assert number in text, number
    n_figures = len(json.loads((run / "figures" / "figures.json").read_text())["figures"]) + 2  # + S2, S3
    assert len(seen["images"]) == n_figures
    assert all(i["complete"] and i["width"] > 0 and i["shown"] > 0 for i in seen["images"]), seen["images"]


@needs_chromium
def test_the_browser_check_sees_a_broken_figure(run, tmp_path):
    """The probe is not blind: an image whose data does not decode is reported with width 0."""
    page = make_report(results_dir=run)
    text = page.read_text(encoding="utf-8")
    page.write_text(re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', text, count=1))
    widths = [i["width"] for i in _in_browser(page, tmp_path)["images"]]
    assert widths[0] == 0 and all(w > 0 for w in widths[1:])
