"""Stage ``report``: one self-contained HTML page with every table and figure of a finished run.

The page is written beside the run's results (``results/<name>/report.html``)
and needs nothing else to be read: figures are embedded as PNG data URIs, the
tables are HTML tables rendered from the ``.md`` files ``dgex tables`` wrote
(so they read as in the paper, with the paper's numbers beside ours where
``report.paper_reference`` put them there), captions come from
``figures.json`` / ``s2.json`` / ``s3.json`` / ``test_sets.json``, and the CSV
and PDF files are linked relative to the page.  The CSS is inline, there is
no JavaScript, and every piece of text from the results is HTML-escaped.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import html
import json
import logging
import os
import re
from pathlib import Path

import pandas as pd

from . import __version__
from .errors import InputError
from .io import atomic_path, check_output_path

log = logging.getLogger(__name__)

#: Tables of the paper in its order, with the section they belong to.
MAIN_TABLES = ("table1", "table2")
SUPPLEMENTARY_TABLES = ("tableS2", "tableS3", "tableS4", "tableS5", "table_stats")
FIGURES = ("figure1", "figure2", "figure3", "figure4", "figure5")

CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; max-width: 66em; margin: 2em auto;
       padding: 0 1em; color: #111; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #999; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; vertical-align: top; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
table.summary td, table.summary th { text-align: left; }
figure { margin: 1em 0; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .caption { font-size: 0.95em; }
.incomplete { border: 2px solid #b00; background: #fee; padding: 0.5em 1em; }
.links { font-size: 0.9em; color: #444; }
.table { overflow-x: auto; } #table_stats table { font-size: 0.8em; } #table_stats td { white-space: nowrap; }
h2, h3, p.caption { break-after: avoid; page-break-after: avoid; }
@media print { body { max-width: none; margin: 0; } a { color: inherit; } .table { overflow: visible; }
  #table_stats table { font-size: 0.62em; } figure img { max-height: 20cm; width: auto; } }
"""


# --------------------------------------------------------------------------- text
def _inline(text: str) -> str:
    """One line of the tables' Markdown as HTML: escaped, then only ``**bold**``, ``<u>…</u>`` and code."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = out.replace("&lt;u&gt;", "<u>").replace("&lt;/u&gt;", "</u>")
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(text: str) -> str:
    """The subset of Markdown ``dgex tables`` writes (paragraphs, pipe tables, bold, underline) as HTML.

    Parameters
    ----------
    text : str
        Content of a ``tables/<name>.md`` file.

    Returns
    -------
    str
        HTML: one ``<p>`` per paragraph (its lines kept apart) and one ``<table>`` per pipe table,
        whose first row becomes the header.
    """
    parts = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.lstrip().startswith("|") for line in lines):
            rows = [_cells(line) for line in lines if not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", line.strip())]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>\n" for r in rows[1:])
            parts.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>")
        else:
            parts.append('<p class="caption">' + "<br>\n".join(_inline(line) for line in lines) + "</p>")
    return "\n".join(parts)


def csv_html(path: Path) -> str:
    """A CSV file as an escaped HTML table (numbers to 4 significant digits, missing values as '–').

    Parameters
    ----------
    path : Path
        CSV with a header row, shape (n_rows, n_columns).

    Returns
    -------
    str
        An HTML ``<table>``: header row, then one row per CSV row.
    """
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc}); rerun the step that wrote it") from None
    return frame.to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0)


# --------------------------------------------------------------------------- files
def _read_json(path: Path, fix: str, optional: bool = False) -> dict | None:
    """A JSON object written by a step of the run; None for an ``optional`` file that is absent."""
    if optional and not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as JSON ({exc}); {fix}") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not a JSON object; {fix}")
    return info


def _inside(run: Path, rel, source: Path, key: str) -> Path:
    """``run/rel``, refused unless ``rel`` is a relative path that stays inside the run folder."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise InputError(
            f"{source}: {key} is {rel!r}, not a path relative to the run folder {run}; write paths such as "
            f"'figures/name.png'"
        )
    path = run / rel
    if not path.is_file():
        raise InputError(f"{source}: {key} names {path}, which does not exist; rerun the step that writes it")
    return path


def _link(base: Path, path: Path, label: str) -> str:
    """A link to ``path`` relative to ``base``, the page's folder, so that it works wherever the run is moved."""
    rel = Path(os.path.relpath(path, base)).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(label)}</a>'


def _figure(base: Path, png: Path, pdf: Path | None, caption: str, title: str) -> str:
    """A ``<figure>``: the PNG embedded, the caption, links to the PNG and PDF files."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    links = [_link(base, png, "PNG")] + ([_link(base, pdf, "PDF (vector)")] if pdf is not None else [])
    label = "" if caption.startswith(("Figure", "Supplementary Figure")) else f"<strong>{html.escape(title)}.</strong> "
    return (
        f'<figure>\n<img src="data:image/png;base64,{data}" alt="{html.escape(title)}">\n'
        f"<figcaption>{label}{_inline(caption)} "
        f'<span class="links">({" · ".join(links)})</span></figcaption>\n</figure>'
    )


# --------------------------------------------------------------------------- sections
def _summary(run: Path, name: str, tables: dict) -> str:
    rows = [
        ("run", name),
        ("results folder", str(run)),
        ("report written", _now()),
        ("dgex (this report)", __version__),
    ]
    info = _read_json(run / "data" / "dataset.json", "rerun `dgex preprocess`", optional=True)
    demo = _read_json(run / "demo" / "demo.json", "rerun `dgex demo-data`", optional=True)
    if info is not None:
        genes = info.get("genes", {})
        rows.append(("inputs", ", ".join(f"{k}: {v}" for k, v in (info.get("inputs") or {}).items())))
        rows.append(
            (
                "dataset",
                f"{info.get('geo_profiles_kept', '?')} GEO profiles kept "
                f"({info.get('duplicates_removed', 0)} duplicates removed); "
                f"{genes.get('landmarks', '?')} landmark and {genes.get('targets', '?')} target genes "
                f"in {len(genes.get('parts') or {}) or '?'} parts; "
                f"standardisation: {info.get('standardize', '?')}; made by dgex {info.get('dgex_version', '?')}",
            )
        )
        rows.append(("splits", ", ".join(f"{k} {v}" for k, v in (info.get("splits") or {}).items())))
    demo_files = set((demo or {}).get("files", {}).values())
    if info is not None and any(Path(p).name in demo_files for p in (info.get("inputs") or {}).values() if p):
        rows.append(("data", "SYNTHETIC demo data (`dgex demo-data`): the numbers show the pipeline works, not D-GEX"))
    info = _read_json(run / "aggregate" / "aggregate.json", "rerun `dgex aggregate`", optional=True)
    if info is not None:
        grid = info.get("grid") or {}
        rows.append(("grid", "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in grid.items())))
        rows.append(("methods", ", ".join(info.get("methods") or [])))
    for task, pick in (tables.get("chosen") or {}).items():
        if pick:
            rows.append(
                (
                    f"chosen ({task})",
                    f"D-GEX-{float(pick['dropout']) * 100:g}% {pick['layers']}×{pick['units']} "
                    f"(validation MAE {pick['validation_mae']:.4f})",
                )
            )
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_inline(str(v))}</td></tr>\n" for k, v in rows)
    return f'<h2 id="summary">Run summary</h2>\n<table class="summary">\n{body}</table>'


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table_section(run: Path, base: Path, tables: dict, names, source: Path) -> str:
    parts = []
    listed = tables.get("tables") or {}
    for name in names:
        if name not in listed:
            continue
        files = {Path(f).suffix: f for f in listed[name]}
        if ".md" not in files or ".csv" not in files:
            raise InputError(f"{source}: tables.{name} lists {listed[name]}, not a .csv and a .md; rerun `dgex tables`")
        md = _inside(run, f"tables/{files['.md']}", source, f"tables.{name}")
        csv = _inside(run, f"tables/{files['.csv']}", source, f"tables.{name}")
        parts.append(
            f'<div class="table" id="{html.escape(name)}">\n{markdown_html(md.read_text(encoding="utf-8"))}\n'
            f'<p class="links">Numbers: {_link(base, csv, csv.name)}</p>\n</div>'
        )
    return "\n".join(parts)


def _figures_section(run: Path, base: Path) -> str:
    info = _read_json(run / "figures" / "figures.json", "rerun `dgex figures`", optional=True)
    if info is None:
        return "<p>No figures in this run (<code>report.figures: false</code>).</p>"
    source = run / "figures" / "figures.json"
    parts = []
    for name, fig in (info.get("figures") or {}).items():
        files = {Path(f).suffix: f for f in fig.get("files", [])}
        if ".png" not in files:
            raise InputError(f"{source}: figures.{name} lists no PNG file; rerun `dgex figures`")
        png = _inside(run, f"figures/{files['.png']}", source, f"figures.{name}.files")
        pdf = _inside(run, f"figures/{files['.pdf']}", source, f"figures.{name}.files") if ".pdf" in files else None
        title = f"Figure {name[len('figure') :]}" if name.startswith("figure") else name
        parts.append(_figure(base, png, pdf, str(fig.get("caption", "")), title))
    skipped = info.get("skipped") or []
    if skipped:
        parts.append(f"<p>Not drawn (no RNA-seq results in this run): {html.escape(', '.join(skipped))}.</p>")
    return "\n".join(parts)


def _interpret_section(run: Path, base: Path) -> str:
    parts = []
    for key in ("s2", "s3"):
        info = _read_json(run / "interpret" / key / f"{key}.json", f"rerun `dgex interpret {key}`", optional=True)
        if info is None:
            continue
        captions = info.get("captions") or {}
        folder = run / "interpret" / key
        parts.append(f'<h3 id="{key}">Supplementary analysis {key.upper()}</h3>')
        png, pdf = folder / f"figure_{key}.png", folder / f"figure_{key}.pdf"
        if png.is_file():
            caption = str(captions.get(f"figure_{key}", ""))
            parts.append(_figure(base, png, pdf if pdf.is_file() else None, caption, f"Figure {key.upper()}"))
        if key == "s2" and (folder / "s2_summary.csv").is_file():
            parts.append(f'<p class="caption">{_inline(str(captions.get("s2_summary", "")))}</p>')
            parts.append(csv_html(folder / "s2_summary.csv"))
        files = [
            _link(base, folder / f"{stem}.csv", f"{stem}.csv") + f": {_inline(str(text))}"
            for stem, text in captions.items()
            if not stem.startswith("figure") and (folder / f"{stem}.csv").is_file()
        ]
        if files:
            parts.append('<ul class="links">' + "".join(f"<li>{f}</li>" for f in files) + "</ul>")
    return "\n".join(parts)


def _test_sets_section(run: Path, base: Path) -> str:
    """The external test sets ``tables/test_sets.json`` lists ('' when the file is absent)."""
    source = run / "tables" / "test_sets.json"
    info = _read_json(source, "rerun the workflow's test-set scoring", optional=True)
    if info is None:
        return ""
    sets = info.get("test_sets")
    if not isinstance(sets, list):
        raise InputError(f"{source}: has no list 'test_sets'; rerun the workflow's test-set scoring")
    parts = ['<h2 id="test-sets">External test sets</h2>']
    for i, entry in enumerate(sets):
        key = f"test_sets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(f"{source}: {key} has no 'name'; rerun the workflow's test-set scoring")
        parts.append(f"<h3>{html.escape(entry['name'])}</h3>")
        parts.append(f'<p class="caption">{_inline(str(entry.get("caption", "")))}</p>')
        if entry.get("table") is not None:
            table = _inside(run, entry["table"], source, f"{key}.table")
            parts.append(csv_html(table) + f'\n<p class="links">Numbers: {_link(base, table, table.name)}</p>')
        for j, fig in enumerate(entry.get("figures") or []):
            fkey = f"{key}.figures[{j}]"
            if not isinstance(fig, dict):
                raise InputError(f"{source}: {fkey} is not an object with png, pdf and caption")
            png = _inside(run, fig.get("png"), source, f"{fkey}.png")
            pdf = _inside(run, fig["pdf"], source, f"{fkey}.pdf") if fig.get("pdf") else None
            parts.append(_figure(base, png, pdf, str(fig.get("caption", "")), f"{entry['name']}, figure {j + 1}"))
    return "\n".join(parts)


# --------------------------------------------------------------------------- page
@contextlib.contextmanager
def _content_of(run: Path, what: str):
    """A JSON file of the run whose values have unexpected types becomes one error naming the section's files."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise InputError(
            f"{run}: the {what} files hold unexpected content ({type(exc).__name__}: {exc}); rerun the steps "
            f"that wrote them"
        ) from None


def render(results_dir, name: str | None = None, base=None) -> str:
    """The report of one run as an HTML page.

    Parameters
    ----------
    results_dir : str or Path
        The run's results folder (``results/<name>``), holding at least ``tables/tables.json``.
    name : str, optional
        Run (config) name shown in the title; default: the folder's name.
    base : str or Path, optional
        Folder the page will be written to (links to CSV/PDF files are relative to it); default: ``results_dir``.

    Returns
    -------
    str
        A complete HTML document, self-contained except for links to the CSV and PDF files.
    """
    run = Path(results_dir)
    base = Path(base) if base is not None else run
    source = run / "tables" / "tables.json"
    if not source.is_file():
        raise InputError(f"{source}: missing; a report needs a finished run: run the workflow (or `dgex tables`) first")
    tables = _read_json(source, "rerun `dgex tables`")
    name = name or run.resolve().name
    with _content_of(run, "tables (tables/tables.json)"):
        incomplete = (tables.get("incomplete") or {}).get("note")
    body = [
        f"<h1>D-GEX results: {html.escape(name)}</h1>",
        "<p>Chen et al., Gene expression inference with deep learning, Bioinformatics 32(12), 2016, "
        "reproduced by dgex. Every model shown was chosen on validation data, as in the paper.</p>",
    ]
    if incomplete:
        body.append(f'<div class="incomplete" id="incomplete"><p>{_inline(incomplete)}</p></div>')
    with _content_of(run, "summary (data/dataset.json, aggregate/aggregate.json, tables/tables.json)"):
        body.append(_summary(run, name, tables))
    with _content_of(run, "tables (tables/tables.json)"):
        body += ['<h2 id="tables">Tables 1–2</h2>', _table_section(run, base, tables, MAIN_TABLES, source)]
        body += [
            '<h2 id="supplementary">Supplementary Tables S2–S5 and statistics</h2>',
            _table_section(run, base, tables, SUPPLEMENTARY_TABLES, source),
        ]
    with _content_of(run, "figures (figures/figures.json)"):
        body += ['<h2 id="figures">Figures 1–5</h2>', _figures_section(run, base)]
    with _content_of(run, "S2/S3 (interpret/s2/s2.json, interpret/s3/s3.json)"):
        interpret = _interpret_section(run, base)
    if interpret:
        body += ['<h2 id="interpret">Supplementary analyses S2 and S3</h2>', interpret]
    with _content_of(run, "test set (tables/test_sets.json)"):
        test_sets = _test_sets_section(run, base)
    if test_sets:
        body.append(test_sets)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>dgex report: {html.escape(name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def make_report(*, results_dir, output=None, name: str | None = None) -> Path:
    """Write the run's report (default ``<results_dir>/report.html``) atomically; returns its path.

    Parameters
    ----------
    results_dir : str or Path
        The run's results folder (``results/<name>``).
    output : str or Path, optional
        Where to write the page (its links to the CSV/PDF files are relative to its folder).
    name : str, optional
        Run (config) name shown in the title; default: the folder's name.
    """
    out = Path(output) if output else Path(results_dir) / "report.html"
    check_output_path(out)
    page = render(results_dir, name, out.parent)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s (%d kB)", out, len(page) // 1024)
    return out
