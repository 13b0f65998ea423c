"""The run report's HTML (trainer/quality/report.py): its style, building blocks (embedded images,
tables, CSV blocks) and one function per section of the page, each returning its parts in page order."""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

import yaml

from trainer.files.layout import RunLayout, comparison_panels, picture_of
from trainer.files.read import read_csv_rows
from trainer.quality.report_data import compare_rows, csv_table, fmt, missing
from trainer.quality.report_headline import HEADER, headline_cells, headline_rows

# -- building blocks -------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1400px;
padding:0 24px 48px;color:#1d1d1f;line-height:1.45}
h1{margin:24px 0 4px;font-size:26px}h2{margin:36px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:24px 0 8px}.muted{color:#666}.status{background:#f4f6f8;border-radius:6px;padding:10px 14px}
nav a{margin-right:14px}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:14px}
figure{margin:0}figure img{width:100%;image-rendering:pixelated;border:1px solid #ddd;background:#fff}
figcaption{font-size:13px;color:#444;margin-top:4px}.wide img{max-width:100%;border:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f4f6f8}
td.l,th.l{text-align:left}td.good{background:#e3f5e1}td.bad{background:#fbe4e4}
pre{background:#f4f6f8;padding:12px;overflow-x:auto;font-size:12px}details{margin:6px 0}
summary{cursor:pointer;color:#0b57d0}.pics{display:flex;flex-wrap:wrap;gap:12px}.pics img{max-width:100%}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not header:
        return '<p class="muted">(empty)</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _csv_block(path: Path, title: str, open_: bool = False) -> str:
    header, rows = csv_table(path)
    if not header:
        return ""
    return (
        f"<details{' open' if open_ else ''}><summary>{html.escape(title)}: {len(rows)} row(s), "
        f"<code>{html.escape(path.name)}</code></summary>{_table(header, rows)}</details>"
    )


def _status(layout: RunLayout, config: dict | None, ks: list[int], finished: list[int]) -> str:
    planned = (config or {}).get("stage2", {}).get("num_iterations") if isinstance(config, dict) else None
    parts = [f"iterations finished: <b>{len(finished)}</b>" + (f" of {planned} planned" if planned else "")]
    open_ks = [k for k in ks if k not in finished]
    for k in open_ks:
        have = []
        if layout.fake_latents(k).is_file():
            have.append("fakes generated")
        if layout.real_latents(k).is_file():
            have.append("reals encoded")
        if layout.discriminator_history(k).is_file():
            have.append(f"D history ({len(csv_table(layout.discriminator_history(k))[1])} rows)")
        if layout.discriminator_best(k).is_file():
            have.append("D trained")
        if layout.finetune_history(k).is_file():
            have.append(f"fine-tune history ({len(csv_table(layout.finetune_history(k))[1])} rows)")
        parts.append(
            f"iteration {k} not finished (running, or stopped): "
            + (", ".join(have) if have else "nothing saved yet")
        )
    if not ks:
        parts.append("no stage-2 iteration has started")
    return '<div class="status">' + "<br>".join(parts) + "</div>"


HEADLINE = (
    ("latent_fd", "latent FD"),
    ("cls_fd", "classifier FD"),
    ("inception_fd", "Inception FD"),
    ("pixel_fd", "pixel FD"),
)


def _headline(summary_rows: list[dict]) -> str:
    """Stage 1 against the latest iteration, in the summary's Fréchet distances (lower is better)."""
    if len(summary_rows) < 2:
        return ""
    first, last = summary_rows[0], summary_rows[-1]
    k = int(last["iteration"]) - 1
    parts = []
    for col, label in HEADLINE:
        a, b = first.get(col), last.get(col)
        if not missing(a) and not missing(b) and a > 0:
            parts.append(f"{label} {fmt(a)} &rarr; <b>{fmt(b)}</b> ({100 * (b - a) / a:+.0f} %)")
    if not parts:
        return ""
    return f"<br>stage 1 &rarr; iteration {k} (lower is better): " + "; ".join(parts)


def _against_teacher(layout: RunLayout) -> str:
    """The page's opening table (report_headline.py, what the demo prints last): the teacher at its full
    steps, this run's latest result at its K and a demo companion's, each FD also as a share of the
    teacher's."""
    rows = headline_rows(layout.root, layout.name)
    teacher = rows[0]
    if teacher.steps is None:
        note = (
            f"no teacher row in this folder ({layout.teacher_summary.name}: advdiff demo measures stage 1 at "
            "training.sample_steps there, the same way as the summary's rows)"
        )
    else:
        note = (
            f"the teacher is the stage-1 model at {teacher.steps} DDIM steps, measured on the summary's "
            "samples, seeds and held-out reals"
        )
    return (
        '<h2 id="headline">Against the teacher</h2><p class="muted">Fréchet distances of the latest summary '
        f"rows, lower is better; &divide; teacher below 1 beats it; {html.escape(note)}.</p>"
        + _table(HEADER, headline_cells(rows))
    )


def _fd_caption(summary_rows: list[dict], row: int) -> str:
    for r in summary_rows:
        if int(r.get("iteration", -1)) == row:
            for col, label in HEADLINE:
                if not missing(r.get(col)):
                    return f", {label} {fmt(r[col])}"
    return ""


def _compare_section(layout: RunLayout, other: Path) -> str:
    other_name = RunLayout.name_in(other) or ""
    b_layout = RunLayout(other, other_name)
    a_rows, b_rows = read_csv_rows(layout.summary), read_csv_rows(b_layout.summary)
    out = [
        f'<h2 id="compare">Compared with {html.escape(str(other))}</h2>',
        f'<p class="muted">A = this run, B = {html.escape(str(other))}. "better" follows each column\'s '
        f"direction (FD lower, precision and recall higher); green where this run is better, red where B is."
        f"</p>",
    ]
    if not b_rows:
        out.append(f'<p class="muted">{html.escape(str(other))} has no quality summary yet.</p>')
    else:
        rows = []
        for k, col, va, vb, diff, better in compare_rows(a_rows, b_rows):
            cls = {"A": "good", "B": "bad"}.get(better, "")
            rows.append(
                f"<tr><td>{k}</td><td class='l'>{html.escape(col)}</td><td class='{cls}'>{fmt(va)}</td>"
                f"<td>{fmt(vb)}</td><td>{fmt(diff)}</td><td>{better}</td></tr>"
            )
        out.append(
            '<div class="scroll"><table><tr><th>iteration</th><th class="l">metric</th><th>A (this run)'
            "</th><th>B</th><th>B - A</th><th>better</th></tr>" + "".join(rows) + "</table></div>"
        )
    ks_b = b_layout.iterations_in()
    figs = [_figure(b_layout.start_grid, "B: stage 1")] + [
        _figure(b_layout.grid(k), f"B: iteration {k}") for k in ks_b
    ]
    if any(figs):
        out.append('<h3>B\'s samples</h3><div class="grids">' + "".join(figs) + "</div>")
    return "\n".join(out)


# -- the page's sections, in order ---------------------------------------------------------------
def page_head(layout: RunLayout, config, ks, finished, summary_rows, compare: bool) -> list[str]:
    """The document head, the title, where and when, the status (with the headline) and the section links."""
    name = layout.name
    sections = [("samples", "Samples"), ("quality", "Quality per iteration")]
    if compare:
        sections.append(("compare", "Comparison"))
    sections += [("iterations", "Iterations"), ("time", "Time"), ("config", "Config")]
    return [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>advdiff report: {html.escape(name)}"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>advdiff run <code>{html.escape(name)}</code></h1>",
        f'<p class="muted">{html.escape(str(layout.root.resolve()))} &middot; page written '
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        _against_teacher(layout),
        _status(layout, config, ks, finished).replace("</div>", _headline(summary_rows) + "</div>", 1),
        "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in sections) + "</nav>",
    ]


def samples_section(layout: RunLayout, config, ks, summary_rows) -> list[str]:
    """The grids (stage 1, each iteration, stage 1's own) and the few-step comparison picture."""
    out = [
        '<h2 id="samples">Samples</h2><p class="muted">Decoded samples from the same fixed seeds, stage 1 '
        "first, then each iteration's result, all at stage 2's DDIM steps; each caption gives the "
        "summary's Fréchet distance of that model (lower is better).</p>"
    ]
    steps = ((config or {}).get("stage2") or {}).get("generation_steps")
    at = f" at {steps} DDIM steps" if steps else ""
    figs = [_figure(layout.start_grid, f"stage 1{at}{_fd_caption(summary_rows, 0)}")]
    figs += [_figure(layout.grid(k), f"iteration {k}{at}{_fd_caption(summary_rows, k + 1)}") for k in ks]
    if layout.stage1_grid.is_file():
        own = ((config or {}).get("training") or {}).get("sample_steps")
        figs.append(
            _figure(
                layout.stage1_grid,
                f"stage 1's own grid{f' at {own} steps' if own else ''} "
                f"({layout.stage1_grid.relative_to(layout.root)})",
            )
        )
    figs = [f for f in figs if f]
    out.append(
        '<div class="grids">' + "".join(figs) + "</div>" if figs else '<p class="muted">No grids yet.</p>'
    )
    if layout.comparison.is_file():
        out.append(_comparison(layout, config))
    return out


def _comparison(layout: RunLayout, config) -> str:
    """The comparison picture, captioned with what its writer drew (else what the config's counts say)."""
    own = ((config or {}).get("training") or {}).get("sample_steps")
    panels = comparison_panels((config or {}).get("stage2") or {}, own)
    unknown = ["K steps"] * (len(panels) - 1) + ["full steps"]  # a config without the counts
    caption = " | ".join(
        f"{model} at {f'{k} steps' if k else fallback}"
        for (model, k), fallback in zip(panels, unknown, strict=True)
    )
    if layout.comparison_captions.is_file():  # what the picture's writer drew (folders since 12-06)
        caption = " | ".join(json.loads(layout.comparison_captions.read_text()))
    return (
        '<h3>What stage 2 bought</h3><div class="wide">'
        + _figure(layout.comparison, f"the same seeds: {caption}")
        + "</div>"
    )


def quality_section(layout: RunLayout, compare) -> list[str]:
    """The quality summary's plot and rows, and with `compare` the other run's beside them."""
    out = ['<h2 id="quality">Quality per iteration</h2>']
    if layout.summary.is_file():
        out.append(
            '<p class="muted">Row 0 is the stage-1 model; row k+1 is iteration k\'s result. FD: lower is '
            "better; precision and recall: higher is better.</p>"
        )
        pic = picture_of(layout.summary)
        if pic.is_file():
            out.append('<div class="wide">' + _figure(pic, "quality summary") + "</div>")
        out.append(_csv_block(layout.summary, "quality summary", open_=True))
    else:
        out.append('<p class="muted">No quality summary yet (it gains a row when an iteration finishes).</p>')
    if compare is not None:
        out.append(_compare_section(layout, Path(compare)))
    return out


def iterations_section(layout: RunLayout, ks, finished) -> list[str]:
    """Each iteration's D and fine-tune pictures and histories."""
    out = ['<h2 id="iterations">Iterations</h2>']
    if not ks:
        out.append('<p class="muted">No iteration has started.</p>')
    for k in ks:
        state = "finished" if k in finished else "not finished"
        out.append(f"<h3>Iteration {k} <span class='muted'>({state})</span></h3>")
        pics = [
            _figure(picture_of(layout.discriminator_history(k)), f"discriminator, iteration {k}"),
            _figure(picture_of(layout.finetune_history(k)), f"diffusion fine-tune, iteration {k}"),
        ]
        pics = [p for p in pics if p]
        if pics:
            out.append('<div class="pics">' + "".join(pics) + "</div>")
        blocks = [
            _csv_block(layout.discriminator_history(k), f"discriminator history, iteration {k}"),
            _csv_block(layout.finetune_history(k), f"fine-tune metrics, iteration {k}"),
        ]
        out.append("".join(blocks) or '<p class="muted">No history written yet.</p>')
    return out


def time_section(layout: RunLayout) -> list[str]:
    """timings.csv by phase (a phase's iterations added up), with shares and the total, then every row."""
    out = ['<h2 id="time">Time</h2>']
    header, rows = csv_table(layout.timings)
    if not (header and "phase" in header and "seconds" in header):
        out.append('<p class="muted">No timings yet.</p>')
        return out
    totals: dict[str, float] = {}
    for row in rows:
        cell = dict(zip(header, row, strict=False))  # a short row (tolerant read) leaves cells missing
        phase = re.sub(r"\s+\d+$", "", cell.get("phase", ""))
        try:
            totals[phase] = totals.get(phase, 0.0) + float(cell.get("seconds", "nan"))
        except ValueError:
            continue
    total = sum(totals.values())
    out.append(
        _table(
            ["phase", "seconds", "share"],
            [[p, f"{s:.1f}", f"{100 * s / total:.0f} %" if total else "-"] for p, s in totals.items()]
            + [["all", f"{total:.1f}", "100 %" if total else "-"]],
        )
    )
    out.append(_csv_block(layout.timings, "every timed phase"))
    return out


def config_section(config: dict | None) -> list[str]:
    """The resolved config as YAML."""
    out = ['<h2 id="config">Config</h2>']
    if config is not None:
        out.append(f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>")
    else:
        out.append('<p class="muted">No config found in the folder.</p>')
    return out
