"""One self-contained HTML page per benchmark run: ``report.html``.

    python -m harness report --html OUT.html          # any finished run, from MLflow
    (every ``run`` logs it to its parent run as ``report/report.html``)

The page is one file: every image is inlined as a ``data:`` URI (PNG, re-encoded with a
256-colour palette where that is smaller), the style sheet is in the page, there is no
JavaScript, and it holds no ``http(s)://`` URL at all: a Content-Security-Policy forbids
loading anything but inline styles and ``data:`` images, and a URL that appears in the text
(a tracking URI in the spec) is written with a zero-width space after its scheme. The
smoke run's page is about 1 MB, the quickstart's 3.3 MB.

What it shows, each part from what MLflow holds for the run (``gather``), and a short "not
in this run" note where that is absent:

- **Table 1** per backbone: ``harness.results.report.collect``'s rows rendered with
  ``harness.results.table``'s own cell, mark and paper functions (value ± half-width of the
  logged ``<metric>_ci_low``/``_ci_high``; bold / underlined as the paired tests of
  ``harness.results.pairwise`` decide; for a Table 1 preset run the paper's value and
  Δ = ours - paper under each number), then #FW measured and seconds per image, the
  caption and the images needed for the target half-width;
- **plots**: the parent's ``report/ad_ic_vs_fw-<backbone>.png`` and
  ``report/pairwise-<backbone>.png`` (``harness.results.report``, ``pairwise.heatmap``);
- **gallery**: the same images across every method of a backbone, cut out of each method
  run's ``overlays.png`` (``harness.results.overlays.save_overlay_grid``: the first images of
  the evaluation, the same for every method), each map with its per-image AD terms and IC
  indicators (``harness.metrics.aggregate.per_image_terms`` of the run's
  ``per_image.parquet``);
- **failure cases**: per method, the misclassified images with the maps of the ground truth
  and of the prediction (``analysis/errors.png``), the class gallery when it is not the
  shortcut class (``analysis/gallery-<class>.png``), and the images whose explanation keeps
  the least of the score (largest AD term at the largest kept fraction);
- **planted shortcut** (quickstart data only): ``analysis/shortcut.png`` per method with
  the energy shares on the cue and on the object (``harness.results.analysis``);
- **deletion / insertion** (when ``evaluation.metrics`` ran them): the mean AUCs and the
  per-image AUCs' spread per method (box plots drawn here). The per-step curves are not
  stored, only each image's area;
- **stage times**: the parent's ``seconds_<stage>`` (driver), ``task_seconds_<stage>``
  (inside the Ray tasks, summed) and ``began_``/``ended_<stage>``
  (``harness.pipeline.runner.Stopwatch``);
- **provenance**: run ids, git commit, package versions, protocol preset, per backbone the
  weights id, data set, evaluation-list hash and decoded pixels' digest, per method its
  variant, origin, RISE mask hash and head file, and the resolved spec file's text.

``gather`` does the reading (MLflow client calls only), ``render`` is a pure function of
what it gathered, ``build`` is both, ``check_target`` refuses an output path before
anything is read (``ReportError``: exit 2) and ``write`` writes the page atomically.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from harness.data.cache import write_text_atomic
from harness.metrics import registry
from harness.metrics.statistics import StatisticsSettings
from harness.results import pairwise, table

#: ``harness.results.overlays.grid``'s margins with row labels and column titles
GRID_LEFT, GRID_TOP = 110, 16
THUMB = 160                      # largest side of a gallery tile kept in the page
WORST = 3                        # worst-explained images listed per method
FIGURES = ("errors.png", "shortcut.png")
PROVENANCE_TAGS = ("weights_id", "dataset", "eval_list_hash", "eval_pixels_digest",
                   "feature_layer", "backbone_origin")
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;
color:#111}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccc;margin-top:1.6em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}
.paper{color:#666;font-size:85%}.absent{color:#888;font-style:italic}
.caption{color:#444;font-size:90%;max-width:1100px}
figure{display:inline-block;margin:.3em .6em .3em 0;vertical-align:top}
figcaption{font-size:85%;color:#333}img{max-width:100%}img.plot{max-width:610px}
img.tile{width:112px;image-rendering:pixelated}table.gallery td{text-align:center;
font-size:80%}.bar{background:#4a7fb5;height:.9em;display:inline-block}
pre{background:#f7f7f7;padding:.6em;overflow:auto;max-height:40em;font-size:85%}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# -- reading MLflow ---------------------------------------------------------------------------
def _download(client, run_id: str, path: str, folder: str) -> bytes | None:
    from mlflow.exceptions import MlflowException
    try:
        return Path(client.download_artifacts(run_id, path, folder)).read_bytes()
    except (MlflowException, OSError):
        return None


def _listing(client, run_id: str, folder: str | None = None) -> list[str]:
    from mlflow.exceptions import MlflowException
    try:
        return [a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir]
    except (MlflowException, OSError):
        return []


def gather(client, parent, data: dict | None = None,
           files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Everything the page shows, read from MLflow: {'data' (``report.collect``), 'parent',
    'runs' (run id -> method run), 'report_files' (name -> bytes: ``files`` when given,
    else the parent's ``report/`` artifacts), 'children' (run id -> {'files': name ->
    bytes, 'per_image': pyarrow table or None}), 'spec' (the spec file's text or None)}."""
    import pyarrow.parquet as pq

    from harness.results import report
    data = data if data is not None else report.collect(client, parent)
    runs = {r.info.run_id: r for r in report.method_runs(client, parent)}
    pid = parent.info.run_id
    with tempfile.TemporaryDirectory(prefix="harness-html-") as tmp, \
            pairwise._no_progress_bars():
        def get(run_id: str, path: str) -> bytes | None:
            folder = os.path.join(tmp, run_id, os.path.dirname(path))
            os.makedirs(folder, exist_ok=True)
            return _download(client, run_id, path, folder)

        if files is None:
            files = {p.rsplit("/", 1)[-1]: b for p in _listing(client, pid, "report")
                     if p.endswith(".png") and (b := get(pid, p)) is not None}
        spec = None
        for run_id in [pid, *runs]:
            yaml_file = next((p for p in _listing(client, run_id) if p.endswith(".yaml")), None)
            if yaml_file and (raw := get(run_id, yaml_file)) is not None:
                spec = raw.decode("utf-8", "replace")
                break
        children = {}
        for run_id in runs:
            names = [p for p in _listing(client, run_id)
                     if p in ("overlays.png", "per_image.parquet")]
            names += [p for p in _listing(client, run_id, "analysis") if p.endswith(".png")]
            got = {p: b for p in names if (b := get(run_id, p)) is not None}
            raw = got.pop("per_image.parquet", None)
            rows = None
            if raw is not None:
                try:
                    rows = pq.read_table(io.BytesIO(raw))
                except (OSError, ValueError):   # damaged: the page says the rows are absent
                    rows = None
            children[run_id] = {"files": got, "per_image": rows}
    return {"data": data, "parent": parent, "runs": runs, "report_files": dict(files),
            "children": children, "spec": spec}


# -- small helpers ----------------------------------------------------------------------------
_SCHEME = re.compile(r"(?i)\b(https?|ftp|wss?)://")


def esc(value: Any) -> str:
    """HTML-escaped text in which no URL remains a URL (module docstring)."""
    return _SCHEME.sub(lambda m: m.group(1) + ":\u200b//", html.escape(str(value)))


def absent(what: str) -> str:
    return f'<p class="absent">{esc(what)}: not in this run.</p>'


def _image(raw: bytes | None = None, im=None):
    from PIL import Image
    if im is None:
        im = Image.open(io.BytesIO(raw))
        im.load()
    return im


def data_uri(raw: bytes | None = None, im=None) -> str | None:
    """A PNG ``data:`` URI of ``raw`` bytes or a PIL image: a 256-colour palette PNG when
    that is smaller than the original; None when the bytes are no image."""
    from PIL import Image
    try:
        im = _image(raw, im)
        flat = im.convert("RGBA")
        if flat.getextrema()[3][0] < 255:       # composite transparency over white
            back = Image.new("RGBA", flat.size, "white")
            flat = Image.alpha_composite(back, flat)
        buf = io.BytesIO()
        flat.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                     dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
        best = buf.getvalue()
        if raw is not None and len(raw) < len(best) and raw[:8] == b"\x89PNG\r\n\x1a\n":
            best = raw
    except Exception:       # noqa: BLE001 (a damaged PNG, any error of PIL's: a note instead)
        return None
    return "data:image/png;base64," + base64.b64encode(best).decode("ascii")


def img(raw: bytes | None, alt: str, caption: str | None = None, im=None,
        cls: str | None = None) -> str:
    uri = data_uri(raw, im)
    if uri is None:
        return absent(f"{alt} (unreadable image)")
    tag = f'<img src="{uri}" alt="{esc(alt)}"' + (f' class="{cls}"' if cls else "") + ">"
    return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>" if caption else tag


def _safe(name: str) -> str:
    from harness.results.report import _safe as safe
    return safe(name)


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


# -- the parts --------------------------------------------------------------------------------
def table1_html(name: str, entry: dict, cols: list[str], note: str,
                settings: StatisticsSettings) -> str:
    """One backbone's Table 1 (``harness.results.table``'s cells, marks and paper lines)."""
    from harness.results.report import title_of
    rows = entry["rows"]
    marks = {c: table.ranks(rows, c) for c in cols}
    head = "".join(f"<th>{esc(table.header(c))}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            text, rank = esc(table.cell(r, c)), marks[c].get(i)
            text = f"<strong>{text}</strong>" if rank == 1 else f"<u>{text}</u>" if rank == 2 \
                else text
            text += "".join(f'<div class="paper">{esc(line)}</div>'
                            for line in table.paper_lines(r, c))
            cells.append(f'<td class="num">{text}</td>')
        cells.append(f'<td class="num">{_fmt(r.get("FW_measured"), ".2f")}</td>')
        cells.append(f'<td class="num">{_fmt(r.get("seconds_per_image"), ".3g")}</td>')
        body.append(f"<tr><th>{esc(r['method'])}</th>{''.join(cells)}</tr>")
    sizes = pairwise.sample_size_text(entry, settings)
    return (f"<h3>{esc(title_of(name, entry))}</h3>"
            f'<table class="table1" data-backbone="{esc(name)}"><thead><tr><th>Method</th>'
            f"{head}<th>#FW measured</th><th>s / image</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f'<p class="caption">{esc(note)}. #FW: nominal forward passes per explanation, '
            "#FW measured: the mean counted per image; s / image: explanation wall time."
            + (f" {esc(sizes)}" if sizes else "") + "</p>")


def plots_html(name: str, files: dict[str, bytes]) -> str:
    parts = []
    for stem, what in (("ad_ic_vs_fw", "AD/IC vs #FW"), ("pairwise", "pairwise significance")):
        raw = files.get(f"{stem}-{_safe(name)}.png")
        parts.append(img(raw, f"{what}, {name}", f"{what}: {name}", cls="plot") if raw
                     else absent(f"{what} plot of {name}"))
    return f"<h3>{esc(name)}</h3>" + "".join(parts)


def overlay_tiles(raw: bytes, n: int | None = None):
    """The image and map tiles of an ``overlays.png`` grid (two rows: the images, their
    maps; ``GRID_LEFT``/``GRID_TOP`` margins), at the images' own size when the grid
    doubled them: ``(images, maps)`` lists of PIL images, or None for another layout."""
    from PIL import Image
    try:
        im = _image(raw).convert("RGB")
    except Exception:       # noqa: BLE001 (a damaged PNG: the gallery says so)
        return None
    h2 = im.height - GRID_TOP
    if h2 <= 0 or h2 % 2 or im.width <= GRID_LEFT:
        return None
    h = h2 // 2
    n = n or (im.width - GRID_LEFT) // h
    if n <= 0 or (im.width - GRID_LEFT) % n:
        return None
    w = (im.width - GRID_LEFT) // n
    rows = []
    for r in range(2):
        row = []
        for j in range(n):
            tile = im.crop((GRID_LEFT + j * w, GRID_TOP + r * h,
                            GRID_LEFT + (j + 1) * w, GRID_TOP + (r + 1) * h))
            if w % 2 == 0 and h % 2 == 0:
                half = tile.resize((w // 2, h // 2), Image.NEAREST)
                if half.resize((w, h), Image.NEAREST).tobytes() == tile.tobytes():
                    tile = half                        # the grid's x2: exactly undone
            if max(tile.size) > THUMB:
                tile.thumbnail((THUMB, THUMB), Image.LANCZOS)
            row.append(tile)
        rows.append(row)
    return rows[0], rows[1]


def _terms(rows, cols: list[str]) -> dict[str, list[float]] | None:
    from harness.metrics.aggregate import per_image_terms
    if rows is None:
        return None
    fractions = [float(c[3:]) / 100 for c in cols if c.startswith("AD_")]
    try:
        return {"ids": [str(i) for i in rows.column("image_id").to_pylist()],
                **{k: list(v) for k, v in per_image_terms(rows, fractions).items()}}
    except (KeyError, ValueError):
        return None


def _term_caption(terms: dict | None, j: int, keys: list[str]) -> str:
    if not terms or j >= len(terms["ids"]):
        return ""
    ads = "/".join(f"{terms[f'AD_{k}'][j]:.0f}" for k in keys if f"AD_{k}" in terms)
    ics = "".join("▲" if terms.get(f"IC_{k}", [0] * (j + 1))[j] > 0 else "·" for k in keys)
    return f"AD {ads} IC {ics}"


def gallery_html(name: str, entry: dict, page: dict, cols: list[str]) -> str:
    """The same images across every method of one backbone, side by side (module
    docstring): a row per image, its original first, then a column per method."""
    keys = [c[3:] for c in cols if c.startswith("AD_")]
    originals, ids, columns, n = None, [], [], None
    for r in entry["rows"]:
        child = page["children"].get(r["run_id"], {})
        raw = child.get("files", {}).get("overlays.png")
        terms = _terms(child.get("per_image"), cols)
        tiles = overlay_tiles(raw, n) if raw is not None else None
        if tiles is None:           # no overlays, or another layout: the whole grid, if any
            columns.append((r["method"], None, raw, terms))
            continue
        n = n or len(tiles[1])
        if originals is None:
            originals, ids = tiles[0], (terms or {}).get("ids", [])
        columns.append((r["method"], tiles[1], raw, terms))
    if originals is None:
        return f"<h3>{esc(name)}</h3>" + absent(f"saliency overlays of {name}")
    head = "".join(f"<th>{esc(m)}</th>" for m, *_ in columns)
    lines = []
    for j, im in enumerate(originals):
        cells = [(f"<th>{img(None, f'image {j}', im=im, cls='tile')}<br>"
                  f"{esc(ids[j] if j < len(ids) else '')}</th>")]
        for method, maps, raw, terms in columns:
            if maps is None:
                cells.append(f"<td>{absent('overlays') if raw is None else ''}</td>")
            elif j < len(maps):
                cells.append(f"<td>{img(None, f'{method} map {j}', im=maps[j], cls='tile')}"
                             f"<br>{esc(_term_caption(terms, j, keys))}</td>")
            else:
                cells.append("<td></td>")
        lines.append(f"<tr>{''.join(cells)}</tr>")
    whole = "".join(img(raw, f"{m} overlays", f"{m}: overlays.png")
                    for m, maps, raw, _ in columns if maps is None and raw is not None)
    return (f"<h3>{esc(name)}</h3><table class=\"gallery\" data-backbone=\"{esc(name)}\">"
            f"<tr><th>image</th>{head}</tr>{''.join(lines)}</table>{whole}"
            f'<p class="caption">Under each map: the per-image AD term (%) at kept '
            f"{'/'.join(keys)}% and IC at each (▲: the confidence rose, ·: it did not).</p>")


def failures_html(name: str, entry: dict, page: dict, cols: list[str]) -> str:
    keys = [c[3:] for c in cols if c.startswith("AD_")]
    parts, worst = [], []
    for r in entry["rows"]:
        child = page["children"].get(r["run_id"], {})
        files = child.get("files", {})
        figs = [(p, raw) for p, raw in sorted(files.items()) if p.endswith("/errors.png")]
        if not any(p.endswith("/shortcut.png") for p in files):
            figs += [(p, raw) for p, raw in sorted(files.items())
                     if p.rsplit("/", 1)[-1].startswith("gallery-")]
        parts += [img(raw, f"{r['method']}: {p}", f"{r['method']}: {p.rsplit('/', 1)[-1]}")
                  for p, raw in figs]
        terms, rows = _terms(child.get("per_image"), cols), child.get("per_image")
        if terms and keys:
            ad = terms[f"AD_{keys[0]}"]
            order = sorted(range(len(ad)), key=lambda i: -ad[i])[:WORST]
            wrong = None
            if rows is not None and {"class_explained", "ground_truth"} <= set(rows.column_names):
                wrong = sum(a != b for a, b in zip(rows.column("class_explained").to_pylist(),
                                                   rows.column("ground_truth").to_pylist()))
            worst.append(f"<tr><th>{esc(r['method'])}</th><td class=\"num\">"
                         f"{'-' if wrong is None else wrong} / {len(ad)}</td><td>"
                         + ", ".join(f"{esc(terms['ids'][i])} ({ad[i]:.1f})" for i in order)
                         + "</td></tr>")
    out = f"<h3>{esc(name)}</h3>" + ("".join(parts) if parts else absent(
        f"error figures of {name} (no misclassified image, or no analysis)"))
    if worst:
        out += (f'<table class="worst" data-backbone="{esc(name)}"><tr><th>Method</th>'
                f"<th>misclassified</th><th>largest AD term at {keys[0]}% kept (image, AD %)"
                f"</th></tr>{''.join(worst)}</table>")
    return out


SHORTCUT_METRICS = (("shortcut_cue_energy", "cue energy"),
                    ("shortcut_object_energy", "object energy (cue images)"),
                    ("shortcut_object_energy_nocue", "object energy (no cue)"),
                    ("shortcut_accuracy_cue", "accuracy (cue)"),
                    ("shortcut_accuracy_nocue", "accuracy (no cue)"))


def shortcut_html(name: str, entry: dict, page: dict) -> str:
    figs, lines = [], []
    for r in entry["rows"]:
        files = page["children"].get(r["run_id"], {}).get("files", {})
        raw = next((b for p, b in files.items() if p.endswith("/shortcut.png")), None)
        if raw is not None:
            figs.append(img(raw, f"{r['method']}: shortcut", r["method"]))
        values = [r.get(k) for k, _ in SHORTCUT_METRICS]
        if any(v is not None for v in values):
            lines.append(f"<tr><th>{esc(r['method'])}</th>" + "".join(
                f'<td class="num">{_fmt(v, ".2f")}</td>' for v in values) + "</tr>")
    if not figs and not lines:
        return ""
    head = "".join(f"<th>{esc(t)}</th>" for _, t in SHORTCUT_METRICS)
    return (f"<h3>{esc(name)}</h3>"
            + (f'<table class="shortcut"><tr><th>Method</th>{head}</tr>{"".join(lines)}</table>'
               if lines else "") + "".join(figs))


def causal_plot(name: str, entry: dict, page: dict, cols=("deletion_auc", "insertion_auc")
                ) -> bytes | None:
    """Box plots of the per-image values of the metrics' columns ``cols`` (the deletion and
    insertion AUCs, ROAD's MoRF and LeRF, ...) per method (PNG bytes)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    series = {m: [] for m in cols}
    labels = []
    for r in entry["rows"]:
        rows = page["children"].get(r["run_id"], {}).get("per_image")
        if rows is None or not set(series) & set(rows.column_names):
            continue
        labels.append(r["method"])
        for m, values in series.items():
            values.append([float(v) for v in rows.column(m).to_pylist()]
                          if m in rows.column_names else [])
    if not labels:
        return None
    fig = Figure(figsize=(5.5 * len(series), 3.8), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (m, values) in zip(axes, series.items()):
        ax.boxplot([v or [float("nan")] for v in values], showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{table.header(m)} per image ({registry.direction(m) or '?'}"
                     " is better)", fontsize=10)
        if all(0 <= x <= 1 for v in values for x in v):
            ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{name}: {', '.join(table.header(m) for m in series)} of each image")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def causal_html(name: str, entry: dict, page: dict) -> str:
    cols = [c for c in table.extra_columns() if any(r.get(c) is not None for r in entry["rows"])]
    if not cols:
        return ""
    costs = list(dict.fromkeys(registry.metric_for(c).name for c in cols))   # FW_<metric>
    lines = "".join(f"<tr><th>{esc(r['method'])}</th>" + "".join(
        f'<td class="num">{esc(table.cell(r, c))}</td>' for c in cols)
        + "".join(f'<td class="num">{_fmt(r.get("FW_" + m), ".0f")}</td>' for m in costs)
        + "</tr>" for r in entry["rows"])
    head = "".join(f"<th>{esc(table.header(c))}</th>" for c in cols) + "".join(
        f"<th>#FW {esc(m)}</th>" for m in costs)
    plot = causal_plot(name, entry, page, tuple(cols))
    return (f"<h3>{esc(name)}</h3><table class=\"causal\"><tr><th>Method</th>{head}</tr>"
            f"{lines}</table>"
            + (img(plot, f"deletion/insertion, {name}") if plot else
               absent("per-image deletion/insertion AUCs"))
            + '<p class="caption">The per-step probability curves are not stored, only '
            "each image's area under them (docs/protocol.md section 9).</p>")


def times_html(metrics: dict[str, float]) -> str:
    driver = {k[len("seconds_"):]: v for k, v in metrics.items() if k.startswith("seconds_")}
    inside = {k[len("task_seconds_"):]: v for k, v in metrics.items()
              if k.startswith("task_seconds_")}
    if not driver and not inside:       # a run that did not get as far as the report
        return ('<p class="absent">Stage times: not in this run (a <code>run</code> logs '
                "them once its cells are recorded).</p>")
    top = max([*driver.values(), *inside.values(), 1e-9])

    def rows(values: dict[str, float], spans: bool) -> str:
        out = []
        for stage, sec in values.items():
            b, e = metrics.get(f"began_{stage}"), metrics.get(f"ended_{stage}")
            span = f"{b:.0f}-{e:.0f} s" if spans and b is not None and e is not None else ""
            out.append(f"<tr><th>{esc(stage)}</th><td class=\"num\">{sec:.1f}</td><td>{span}"
                       f"</td><td><span class=\"bar\" style=\"width:{300 * sec / top:.0f}px\">"
                       "</span></td></tr>")
        return "".join(out)
    head = "<tr><th>stage</th><th>seconds</th><th>at (since start)</th><th></th></tr>"
    out = (f'<table class="times"><caption>The driver</caption>{head}{rows(driver, True)}'
           "</table>" if driver else absent("the driver's stage times"))
    out += (f'<table class="times"><caption>Inside the Ray tasks (summed over tasks: on N '
            f"workers they overlap)</caption>{head}{rows(inside, False)}</table>"
            if inside else "")
    return out


def _kv(pairs) -> str:
    return "<table class=\"kv\">" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                           for k, v in pairs) + "</table>"


def provenance_html(page: dict) -> str:
    parent, data = page["parent"], page["data"]
    tags = parent.data.tags

    def when(ms: int | None) -> str:
        return (_dt.datetime.fromtimestamp(ms / 1000, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                if ms else "-")
    run = [("experiment", data.get("experiment", "")), ("run", parent.info.run_id),
           ("name", parent.info.run_name), ("status", parent.info.status),
           ("started", when(parent.info.start_time)), ("ended", when(parent.info.end_time))]
    run += sorted((k, v) for k, v in tags.items() if not k.startswith(("mlflow.", "version.")))
    run += sorted((k, v) for k, v in parent.data.params.items())
    versions = sorted((k[len("version."):], v) for k, v in tags.items()
                      if k.startswith("version."))
    per_backbone, per_method = [], []
    for name, entry in data["backbones"].items():
        first = page["runs"].get(entry["rows"][0]["run_id"]) if entry["rows"] else None
        t = first.data.tags if first else {}
        per_backbone.append(f"<tr><th>{esc(name)}</th>" + "".join(
            f"<td>{esc(t.get(k, '-'))}</td>" for k in PROVENANCE_TAGS) + "</tr>")
        for r in entry["rows"]:
            run_ = page["runs"].get(r["run_id"])
            rt = run_.data.tags if run_ else {}
            head = (run_.data.params.get("param.checkpoint", "") if run_ else "")
            per_method.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in (
                name, r["method"], r["method_id"], r["variant"], rt.get("method_origin", ""),
                rt.get("rise_mask_hash", ""), os.path.basename(head), r["status"],
                r["run_id"])) + "</tr>")
    out = "<h3>Run</h3>" + _kv(run)
    out += "<h3>Versions</h3>" + (_kv(versions) if versions else absent("package versions"))
    out += ("<h3>Weights and data</h3><table class=\"provenance\"><tr><th>backbone</th>"
            + "".join(f"<th>{esc(k)}</th>" for k in PROVENANCE_TAGS) + "</tr>"
            + "".join(per_backbone) + "</table>")
    out += ("<h3>Method runs</h3><table class=\"provenance\"><tr>" + "".join(
        f"<th>{h}</th>" for h in ("backbone", "method", "id", "variant", "origin",
                                  "RISE mask hash", "head file", "status", "run"))
        + "</tr>" + "".join(per_method) + "</table>")
    out += "<h3>Spec</h3>" + (f"<pre>{esc(page['spec'])}</pre>" if page.get("spec")
                              else absent("the spec file"))
    return out


# -- the page ---------------------------------------------------------------------------------
SECTIONS = (("table1", "Table 1"), ("plots", "AD/IC vs #FW and significance"),
            ("gallery", "Gallery"), ("failures", "Failure cases"),
            ("shortcut", "Planted shortcut"), ("causal", "Deletion / insertion"),
            ("times", "Stage times"), ("provenance", "Provenance"))


def render(page: dict) -> str:
    """The page (module docstring) of what ``gather`` returned: one HTML string."""
    from harness.results.report import caption
    data, parent = page["data"], page["parent"]
    cols, settings = data["columns"], data.get("settings") or StatisticsSettings()
    note = caption(data)
    backbones = data["backbones"].items()
    body = {
        "table1": "".join(table1_html(n, e, cols, note, settings) for n, e in backbones),
        "plots": "".join(plots_html(n, page["report_files"]) for n, _ in backbones),
        "gallery": "".join(gallery_html(n, e, page, cols) for n, e in backbones),
        "failures": "".join(failures_html(n, e, page, cols) for n, e in backbones),
        "shortcut": "".join(shortcut_html(n, e, page) for n, e in backbones)
        or absent("a planted-shortcut figure (only the quickstart data set has one)"),
        "causal": "".join(causal_html(n, e, page) for n, e in backbones)
        or absent("deletion and insertion (evaluation.metrics: [ad_ic, deletion, insertion] "
                  "adds them)"),
        "times": times_html(parent.data.metrics),
        "provenance": provenance_html(page),
    }
    title = f"{parent.info.run_name or 'benchmark'}: {data.get('experiment', '')}"
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t in SECTIONS)
    sections = "".join(f'<section id="{k}"><h2>{esc(t)}</h2>{body[k]}</section>'
                       for k, t in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>Experiment <code>{esc(data.get('experiment', ''))}</code>, "
            f"run <code>{esc(parent.info.run_id)}</code>, git "
            f"<code>{esc(parent.data.tags.get('git_commit', '-'))}</code>; page written "
            f"{stamp} by <code>python -m harness report --html</code>. "
            f"{esc(registry.directions_text(data.get('columns') or []))}</p>"
            f"<nav>{nav}</nav>{sections}</body></html>\n")


def build(client, parent, data: dict | None = None,
          files: dict[str, bytes] | None = None) -> str:
    """``render(gather(...))``."""
    return render(gather(client, parent, data, files))


def check_target(value: str | os.PathLike, flag: str = "--html") -> Path:
    """The page's path, or ``ReportError`` (exit 2) naming ``flag`` and the file: it must
    end in .html, not be a folder, and lie in a folder that is (or can be made) writable."""
    from harness.results.report import ReportError
    path = Path(value)
    if path.is_dir():
        raise ReportError(f"{flag} {value}: is a folder; name the page to write, e.g. "
                          f"{path / 'report.html'}")
    if path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"{flag} {value}: the file name must end in .html")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ReportError(f"{flag} {value}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReportError(f"{flag} {value}: cannot write into {folder}")
    return path


def files_of(paths) -> dict[str, bytes]:
    """The report's PNG files just written (``report.write_report``'s paths) by name, for
    ``gather``'s ``files``."""
    return {Path(p).name: Path(p).read_bytes() for p in paths if str(p).endswith(".png")}


def write(path: str | os.PathLike, text: str) -> Path:
    """Write the page atomically (a reader sees no page or the whole page)."""
    return write_text_atomic(path, text)


__all__ = ["build", "check_target", "data_uri", "esc", "files_of", "gather", "overlay_tiles",
           "render", "write"]
