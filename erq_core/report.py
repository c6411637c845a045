"""report.html: one self-contained page that shows what a run did (no script, no network).

FP against quantized top-1/top-5, the time of each stage, peak memory, a chart of every
quantized layer's relative output error after each step that metrics.json records for it
(round-to-nearest, Aqer, Wqer, and whatever steps a method adds): a user sees at a glance which
layers hurt; and a table of every layer's bit widths (a `--max-drop` run keeps some at 8 bits). Charts are inline SVG drawn here; every user-supplied string is escaped.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Optional

from erq_core.checkpoint import write_atomic
from erq_core.files import CONFIG_FILE, METRICS_FILE, REPORT_FILE

# how the known per-layer steps are labelled; any other numeric key of a layer is one more series
STEP_LABELS = {"rtn": "round-to-nearest", "aqer": "after Aqer", "wqer": "after Wqer"}
# numeric per-layer keys that are not errors (erq+'s chosen ridge strength)
NOT_ERRORS = {"alpha"}
PALETTE = ("#9aa5b1", "#e8a33d", "#2f7dd1", "#3aa66b", "#b5489c", "#d1495b", "#5b5f97", "#7a9e3b")
STAGE_COLOR = "#2f7dd1"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde3ea; }
.sub { color: #5d6b7a; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 4px 12px; border-bottom: 1px solid #eef1f4; }
th { text-align: left; color: #5d6b7a; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.delta-bad { color: #c0392b; } .delta-good { color: #2e8b57; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; }
.card { border: 1px solid #dde3ea; border-radius: 8px; padding: 10px 16px; min-width: 200px; }
.card .big { font-size: 24px; font-weight: 600; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2733; } svg .axis { stroke: #b8c2cc; } svg .grid { stroke: #eef1f4; }
.legend span { display: inline-block; margin-right: 16px; } .legend i { display: inline-block; width: 12px; height: 12px;
  margin-right: 5px; vertical-align: -1px; border-radius: 2px; }
"""


def _num(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def layer_series(layers: list[dict]) -> list[str]:
    """The per-layer error steps present in metrics.json: the known ones in pipeline order, then
    any others (a method's extra steps) in the order they first appear."""
    series: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            if key != "name" and key not in NOT_ERRORS and isinstance(value, (int, float)) and not isinstance(value, bool) and key not in series:
                series.append(key)
    known = list(STEP_LABELS)
    return sorted(series, key=lambda k: (known.index(k) if k in known else len(known), series.index(k)))


def _accuracy_section(metrics: dict) -> str:
    fp, quant = metrics.get("fp") or {}, metrics.get("quantized") or {}
    rows = []
    for key, label in (("top1", "top-1 %"), ("top5", "top-5 %")):
        a, b = fp.get(key), quant.get(key)
        delta = "" if a is None or b is None else f"{b - a:+.2f}"
        css = "" if not delta else ("delta-bad" if b < a else "delta-good")
        rows.append(f'<tr><th>{label}</th>'
                    f'<td class="num" data-metric="fp.{key}" data-value="{json.dumps(a)}">{_num(a)}</td>'
                    f'<td class="num" data-metric="quantized.{key}" data-value="{json.dumps(b)}">{_num(b)}</td>'
                    f'<td class="num {css}">{delta}</td></tr>')
    n_val = metrics.get("n_val")
    note = f"on {n_val} validation images" if n_val else "not evaluated (evaluate was off)"
    return ('<h2>Accuracy</h2><table id="accuracy"><tr><th></th><th>full precision</th><th>quantized</th>'
            f'<th>change</th></tr>{"".join(rows)}</table><p class="sub">{escape(note)}</p>'
            + _float64_note(metrics.get("quantized_float64")) + _onnxruntime_note(metrics.get("onnxruntime")))


def _onnxruntime_note(scores: Optional[dict]) -> str:
    """Each exported ONNX file's own top-1 / top-5 (onnxruntime on the same val images)."""
    if not scores:
        return ""
    rows = "".join(
        f'<tr><th>{escape(fmt)}</th>' + "".join(
            f'<td class="num" data-metric="onnxruntime.{escape(fmt)}.{key}" data-value="{json.dumps(score.get(key))}">'
            f'{_num(score.get(key))}</td>' for key in ("top1", "top5")) + "</tr>"
        for fmt, score in scores.items())
    return ('<h3>The exported files in onnxruntime</h3><table id="onnxruntime"><tr><th>format</th><th>top-1 %</th>'
            f'<th>top-5 %</th></tr>{rows}</table><p class="sub">Each file run by onnxruntime (CPU provider) on '
            'the same validation images.</p>')


def _float64_note(float64: Optional[dict]) -> str:
    """The float64 evaluation that model-float64.onnx reproduces, when the run made one."""
    if not float64:
        return ""
    cells = " ".join(f'{label} <span class="num" data-metric="quantized_float64.{key}" '
                     f'data-value="{json.dumps(float64.get(key))}">{_num(float64.get(key))}</span>'
                     for key, label in (("top1", "top-1 %"), ("top5", "top-5 %")))
    return (f'<p class="sub">Computed in float64, as model-float64.onnx computes it: {cells}. At the last '
            'float bit a float32 runtime may round a few activations the other way.</p>')


def _stages_section(seconds: dict) -> str:
    stages = [(k, float(v)) for k, v in seconds.items() if k != "total" and isinstance(v, (int, float))]
    if not stages:
        return ""
    longest = max(v for _, v in stages) or 1.0
    label_w, bar_w, row_h = 170, 620, 22
    height = row_h * len(stages) + 10
    bars = []
    for i, (name, value) in enumerate(stages):
        y = 5 + i * row_h
        w = max(1.0, bar_w * value / longest)
        bars.append(f'<g class="stage" data-stage="{escape(name)}" data-seconds="{value}">'
                    f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(name)}</text>'
                    f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{STAGE_COLOR}" rx="2">'
                    f'<title>{escape(name)}: {value:.3f} s</title></rect>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:.2f} s</text></g>')
    total = seconds.get("total")
    return (f'<h2>Time per stage</h2><p class="sub">total {_num(total)} s</p>'
            f'<svg id="stages" width="{label_w + bar_w + 80}" height="{height}" role="img" '
            f'aria-label="seconds per stage">{"".join(bars)}</svg>')


def _memory_section(metrics: dict) -> str:
    cards = [("peak memory (RSS)", metrics.get("peak_memory_bytes"))]
    if metrics.get("peak_gpu_memory_bytes") is not None:
        cards.append(("peak GPU memory", metrics.get("peak_gpu_memory_bytes")))
    html = "".join(f'<div class="card"><div>{label}</div><div class="big" data-bytes="{value}">{_bytes(value)}</div>'
                   f'</div>' for label, value in cards)
    device = escape(str(metrics.get("device", "")))
    return f'<h2>Memory</h2><div class="cards">{html}</div><p class="sub">device: {device}</p>'


def _layer_chart(layers: list[dict]) -> str:
    """Grouped horizontal bars, one group per quantized layer, log-scaled relative output error."""
    series = layer_series(layers)
    values = [layer[s] for layer in layers for s in series if isinstance(layer.get(s), (int, float))]
    if not layers or not series:
        return "<h2>Per-layer error</h2><p>metrics.json records no per-layer errors.</p>"
    positive = [v for v in values if v > 0] or [1e-6]
    lo = math.floor(math.log10(min(positive)))
    hi = max(lo + 1, math.ceil(math.log10(max(positive))))
    label_w, plot_w, bar_h, gap = 190, 760, 7, 8
    group_h = bar_h * len(series) + gap
    top, height = 26, 26 + group_h * len(layers) + 24

    def x_of(v: float) -> float:
        v = max(v, 10.0**lo)
        return label_w + plot_w * (math.log10(v) - lo) / (hi - lo)

    parts = []
    for d in range(lo, hi + 1):  # decades: grid lines and labels
        x = x_of(10.0**d)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 20}"/>'
                     f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle">1e{d}</text>')
    for i, layer in enumerate(layers):
        y0 = top + i * group_h
        name = escape(str(layer.get("name", f"layer {i}")))
        bars = []
        for k, step in enumerate(series):
            value = layer.get(step)
            if not isinstance(value, (int, float)):
                continue
            color = PALETTE[k % len(PALETTE)]
            bars.append(f'<rect class="bar" data-series="{escape(step)}" data-value="{value!r}" x="{label_w}" '
                        f'y="{y0 + k * bar_h}" width="{max(0.5, x_of(value) - label_w):.1f}" height="{bar_h - 1}" '
                        f'fill="{color}"><title>{name} {escape(STEP_LABELS.get(step, step))}: {value:.3g}</title></rect>')
        parts.append(f'<g class="layer" data-layer="{name}"><text x="{label_w - 8}" y="{y0 + group_h / 2 + 1:.1f}" '
                     f'text-anchor="end">{name}</text>{"".join(bars)}</g>')
    parts.append(f'<line class="axis" x1="{label_w}" y1="{top - 4}" x2="{label_w}" y2="{height - 20}"/>')
    legend = "".join(f'<span><i style="background:{PALETTE[k % len(PALETTE)]}"></i>{escape(STEP_LABELS.get(s, s))}'
                     f'</span>' for k, s in enumerate(series))
    last = series[-1]
    worst = sorted((layer for layer in layers if isinstance(layer.get(last), (int, float))),
                   key=lambda layer: -layer[last])[:5]
    worst_rows = "".join(f'<tr><td>{escape(str(layer["name"]))}</td><td class="num">{layer[last]:.4g}</td></tr>'
                         for layer in worst)
    return ('<h2>Per-layer relative output error</h2>'
            '<p class="sub">||X&#770;W&#770;&#7488; &minus; XW&#7488;||&sup2; / ||XW&#7488;||&sup2; on the calibration '
            'set, log scale; shorter is better.</p>'
            f'<div class="legend">{legend}</div>'
            f'<svg id="layer-errors" width="{label_w + plot_w + 30}" height="{height}" role="img" '
            f'aria-label="relative output error per layer">{"".join(parts)}</svg>'
            f'<h2>Layers that hurt most ({escape(STEP_LABELS.get(last, last))})</h2>'
            f'<table id="worst-layers"><tr><th>layer</th><th>error</th></tr>{worst_rows}</table>')


def _bits(value: Optional[int]) -> str:
    return "&ndash;" if value is None else str(value)


def _precision_section(precision: list[dict], layers: list[dict], budget: Optional[dict]) -> str:
    """Every layer's bit widths (a --max-drop run raises some to 8) beside its final output error."""
    if not precision:
        return ""
    errors = {layer.get("name"): layer for layer in layers}
    series = layer_series(layers)
    last = series[-1] if series else None
    rows = []
    for entry in precision:
        name = escape(str(entry["name"]))
        error = (errors.get(entry["name"]) or {}).get(last) if last else None
        rows.append(f'<tr class="precision" data-layer="{name}" data-w-bits="{json.dumps(entry.get("w_bits"))}" '
                    f'data-a-bits="{json.dumps(entry.get("a_bits"))}"><td>{name}</td>'
                    f'<td class="num">{_bits(entry.get("w_bits"))}</td><td class="num">{_bits(entry.get("a_bits"))}</td>'
                    f'<td class="num">{"" if error is None else f"{error:.4g}"}</td></tr>')
    note = ""
    if budget:
        drop = budget.get("drop_heldout")
        note = (f'<p class="sub" id="budget">accuracy budget {budget.get("max_drop")} points: '
                f'{budget.get("layers_at_8_bits")} of {budget.get("layers")} layers at 8 bits, held-out drop '
                f'{_num(drop)} points on {budget.get("heldout_images")} train/ images outside the calibration '
                f'draw{"" if budget.get("met") else " (not met even with every layer at 8 bits)"}</p>')
    return ('<h2>Per-layer precision</h2>' + note +
            '<table id="precision"><tr><th>layer</th><th>weight bits</th><th>input bits</th>'
            f'<th>error ({escape(STEP_LABELS.get(last, last or ""))})</th></tr>{"".join(rows)}</table>')


def render_report(metrics: dict, config: dict[str, Any]) -> str:
    q = config.get("quantization", {})
    erq_config = config.get("erq_config", {})
    title = (f"{erq_config.get('model', '?')}: {q.get('method', '?')} W{q.get('w_bits', '?')}/"
             f"A{q.get('a_bits', '?')}" + (" (per-token activations)" if q.get("act_granularity") == "token" else ""))
    settings = ", ".join(f"{k}={v}" for k, v in erq_config.items() if k not in ("model", "dataset", "checkpoint"))
    created = config.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = "".join([
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(str(created))} &middot; {escape(settings)}</p>',
        _accuracy_section(metrics),
        _stages_section(metrics.get("seconds") or {}),
        _memory_section(metrics),
        _layer_chart(metrics.get("layers") or []),
        _precision_section(metrics.get("precision") or [], metrics.get("layers") or [], metrics.get("budget")),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<style>{CSS}</style></head><body>{body}</body></html>\n')


def write_report(folder: str | Path) -> Path:
    """Write FOLDER/report.html from the metrics.json and config.json of a run."""
    folder = Path(folder)
    metrics = json.loads((folder / METRICS_FILE).read_text())
    config = json.loads((folder / CONFIG_FILE).read_text())
    path = folder / REPORT_FILE
    write_atomic(path, render_report(metrics, config).encode())
    return path
