"""Every sample of a GRPO step, inspectable (``rollouts.dump_every``): each sample's PNG, one JSON record per sample
and a gallery page that opens from the file system (no server: inline CSS/JS, relative image paths).

    <run_dir>/rollouts/step-000009/
        index.html      the gallery: a table sortable by any reward, the total and the advantage (click a header),
                        the best and worst samples of each reward on top, links to the previous and next dumped steps
        samples.jsonl   one record per sample: prompt, task, seed, weight version, each reward's score and details,
                        the total, the advantage, excluded or not and why, its image file
        images/0000.png ... (a sample whose decode failed has no image; its record says why)

    if gallery.due(step, cfg.rollouts.dump_every, cfg.steps):
        records = gallery.dump(run.path / "rollouts", step, batch, images)
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = "samples.jsonl"
_STEP_DIR = re.compile(r"step-(\d+)$")


def due(step: int, every: int, steps: int) -> bool:
    """Dump at the first step, every ``every`` steps and the last (the grids' rule); ``every`` 0 = never."""
    return every > 0 and (step == 0 or (step + 1) % every == 0 or step + 1 == steps)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def dumped_steps(root: Path) -> list[int]:
    """Steps with a complete dump (the records are written last), in order."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_STEP_DIR.match(p.name) for p in root.iterdir() if (p / SAMPLES).is_file())
    return sorted(int(m.group(1)) for m in found if m)


def records(step: int, batch, images: list) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of ``batch`` (a GRPO step's rollouts with their prompt records), in order."""
    out = []
    for i, r in enumerate(batch.rollouts):
        rec = batch.record_of(i)
        out.append({
            "index": i, "step": step, "request_id": r.request_id, "group": r.group, "prompt": r.prompt,
            "task": r.task, "metadata": getattr(rec, "metadata", {}) or {}, "seed": r.seed,
            "temperature": r.temperature, "weight_version": r.weight_version,
            "rewards": {n: _finite(v) for n, v in r.rewards.items()}, "reward_details": r.reward_details,
            "reward": _finite(r.reward), "advantage": _finite(r.advantage),
            "excluded": bool(r.excluded), "excluded_reason": r.excluded or None,
            "image": f"images/{i:04d}.png" if images[i] is not None else None,
        })
    return _plain(out)


def dump(root: Path, step: int, batch, images: list) -> list[dict[str, Any]]:
    """Write step ``step``'s samples and gallery under ``root`` (``<run_dir>/rollouts``); returns the records.

    Dumps of later steps are from an attempt this run has gone back on (a resume from an earlier checkpoint) and
    are removed; the previous dump's page gets its link to this one."""
    from PIL import Image

    root = Path(root)
    truncate(root, step)  # also this step's own earlier dump
    folder = step_dir(root, step)
    (folder / "images").mkdir(parents=True)
    recs = records(step, batch, images)
    for rec, im in zip(recs, images):
        if im is not None:
            Image.fromarray(np.asarray(im)).save(folder / rec["image"])
    tmp = folder / (SAMPLES + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in recs))
    tmp.rename(folder / SAMPLES)  # last: a folder without it is an unfinished dump
    steps = dumped_steps(root)
    prev = steps[steps.index(step) - 1] if steps.index(step) > 0 else None
    render(root, step, prev, None)
    if prev is not None:
        render(root, prev, steps[steps.index(prev) - 1] if steps.index(prev) > 0 else None, step)
    return recs


def truncate(root: Path, upto_step: int) -> int:
    """Remove the dumps of steps >= ``upto_step`` (they will be run again) and unlink the last one kept from them;
    returns how many were removed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    gone = 0
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and int(m.group(1)) >= upto_step:
            shutil.rmtree(p)
            gone += 1
    steps = dumped_steps(root)
    if gone and steps:
        render(root, steps[-1], steps[-2] if len(steps) > 1 else None, None)
    return gone


def load(root: Path, step: int) -> list[dict[str, Any]]:
    text = (step_dir(root, step) / SAMPLES).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def render(root: Path, step: int, prev: int | None, nxt: int | None) -> Path:
    """(Re)write ``step-N/index.html`` from its samples.jsonl, linking the neighbouring dumped steps."""
    recs = load(root, step)
    names = sorted({n for r in recs for n in r["rewards"]})
    data = json.dumps({"step": step, "rewards": names, "samples": recs}, allow_nan=False)
    data = data.replace("<", "\\u003c")  # no "</script>" inside the inline JSON, whatever a prompt holds

    def link(s: int | None, label: str) -> str:
        return (f'<a id="{label}" href="../step-{s:06d}/index.html">{"&larr; " if label == "prev" else ""}'
                f'step {s}{" &rarr;" if label == "next" else ""}</a>' if s is not None
                else f'<span id="{label}" class="off">no {"earlier" if label == "prev" else "later"} dump</span>')

    html = (_PAGE.replace("@CSS@", _CSS).replace("@JS@", _JS).replace("@TITLE@", f"rollouts of step {step}")
            .replace("@PREV@", link(prev, "prev")).replace("@NEXT@", link(nxt, "next")).replace("@STEP@", str(step))
            .replace("@DATA@", data))  # last: a prompt's text is never read as a placeholder
    out = step_dir(root, step) / "index.html"
    out.write_text(html)
    return out


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _plain(v):
    """Strict JSON of what a record may hold (reward details come from any reward): numpy values as Python ones,
    NaN and infinities as null, anything else unknown as its text."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return _plain(v.tolist())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


_CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
nav{margin-bottom:8px} nav>*{margin-right:16px} .off{color:#999}
h1{font-size:18px;margin:8px 0} h2{font-size:15px;margin:16px 0 6px}
.extreme{display:flex;gap:24px;align-items:flex-start;margin-bottom:10px;flex-wrap:wrap}
.extreme .name{width:140px;font-weight:600} .strip{display:flex;gap:6px}
figure{margin:0;text-align:center;font-size:12px} figure img{width:112px;height:112px}
img{image-rendering:pixelated;object-fit:contain;background:#eee}
table{border-collapse:collapse;margin-top:8px} th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0} th.sortable{cursor:pointer} th.sorted-desc::after{content:" \\25BC"}
th.sorted-asc::after{content:" \\25B2"} td.num{text-align:right;font-variant-numeric:tabular-nums}
td img{width:96px;height:96px} tr.excluded{background:#fff0f0} td.prompt{max-width:360px} .err{color:#b00}
td.details{font-size:12px;max-width:320px;white-space:pre-wrap} tr:target{outline:2px solid #36c}
"""

# The page builds itself from the inline JSON: the extremes strip per reward, then the table; a header click sorts
# (numbers high first, again for low first; samples without a value always last) and records it in the URL's hash.
_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const fmt = v => v === null || v === undefined ? '' : (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : String(v));
const cols = [
  {key: 'index', label: '#', num: true, get: s => s.index},
  {key: 'image', label: 'image'},
  {key: 'prompt', label: 'prompt', get: s => s.prompt},
  {key: 'task', label: 'task', get: s => s.task},
  {key: 'group', label: 'group', num: true, get: s => s.group},
  {key: 'seed', label: 'seed', num: true, get: s => s.seed},
  ...D.rewards.map(n => ({key: 'reward:' + n, label: n, num: true, get: s => s.rewards[n]})),
  {key: 'reward', label: 'total', num: true, get: s => s.reward},
  {key: 'advantage', label: 'advantage', num: true, get: s => s.advantage},
  {key: 'excluded', label: 'excluded (why)', get: s => s.excluded_reason},
  {key: 'details', label: 'reward details'},
];
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}
function image(s) { return s.image ? el('img', {src: s.image, alt: 'sample ' + s.index}) : el('span', {class: 'err'}, 'no image'); }
function details(s) {
  return Object.entries(s.reward_details || {}).map(([n, d]) =>
    n + ': ' + Object.entries(d).map(([k, v]) => k + '=' + (typeof v === 'object' ? JSON.stringify(v) : fmt(v))).join(', ')).join('\n');
}
function extremes() {
  const box = document.getElementById('extremes');
  const k = Math.max(1, Math.min(4, Math.floor(D.samples.length / 2)));
  for (const c of cols.filter(c => c.key.startsWith('reward'))) {
    const scored = D.samples.filter(s => c.get(s) !== null && c.get(s) !== undefined && s.image);
    if (!scored.length) continue;
    scored.sort((a, b) => c.get(b) - c.get(a));
    const strip = list => el('div', {class: 'strip'}, ...list.map(s =>
      el('figure', {}, el('a', {href: '#row-' + s.index}, image(s)), el('figcaption', {}, fmt(c.get(s)) + ' #' + s.index))));
    box.append(el('div', {class: 'extreme', 'data-reward': c.key}, el('div', {class: 'name'}, c.label),
      el('div', {}, 'best', strip(scored.slice(0, k))), el('div', {}, 'worst', strip(scored.slice(-k).reverse()))));
  }
}
function rows(order) {
  const body = document.querySelector('#samples tbody');
  body.replaceChildren(...order.map(s => {
    const tr = el('tr', {id: 'row-' + s.index, 'data-index': s.index, class: s.excluded ? 'excluded' : ''});
    for (const c of cols) {
      if (c.key === 'image') tr.append(el('td', {}, s.image ? el('a', {href: s.image}, image(s)) : image(s)));
      else if (c.key === 'details') tr.append(el('td', {class: 'details'}, details(s)));
      else tr.append(el('td', {class: c.num ? 'num' : c.key}, fmt(c.get(s))));
    }
    return tr;
  }));
}
function sortBy(key, dir) {
  const c = cols.find(c => c.key === key && c.get);
  if (!c) return;
  const sign = dir === 'asc' ? 1 : -1;
  const missing = v => v === null || v === undefined || v === '';
  const order = [...D.samples].sort((a, b) => {
    const x = c.get(a), y = c.get(b);
    if (missing(x) || missing(y)) return missing(x) - missing(y) || a.index - b.index;
    return (c.num ? (x - y) : String(x).localeCompare(String(y))) * sign || a.index - b.index;
  });
  rows(order);
  document.querySelectorAll('#samples th').forEach(th => th.classList.remove('sorted-asc', 'sorted-desc'));
  document.querySelector(`#samples th[data-key="${CSS.escape(key)}"]`).classList.add('sorted-' + dir);
  history.replaceState(null, '', '#sort=' + encodeURIComponent(key) + ':' + dir);
}
function start() {
  const head = el('tr', {});
  for (const c of cols) {
    const th = el('th', {'data-key': c.key, class: c.get ? 'sortable' : ''}, c.label);
    if (c.get) th.addEventListener('click', () => {
      const now = th.classList.contains('sorted-desc') ? 'asc' : th.classList.contains('sorted-asc') ? 'desc' : (c.num ? 'desc' : 'asc');
      sortBy(c.key, now);
    });
    head.append(th);
  }
  document.querySelector('#samples thead').append(head);
  const n = D.samples.length, out = D.samples.filter(s => s.excluded).length;
  const versions = [...new Set(D.samples.map(s => s.weight_version))].join(', ');
  const means = D.rewards.map(r => {
    const v = D.samples.map(s => s.rewards[r]).filter(x => x !== null && x !== undefined);
    return r + ' ' + (v.length ? (v.reduce((a, b) => a + b, 0) / v.length).toFixed(4) : 'n/a');
  });
  document.getElementById('summary').textContent =
    `${n} samples, ${out} excluded; weight version ${versions}; mean ${means.join(', ')}`;
  extremes();
  fromHash();
  window.addEventListener('hashchange', fromHash);
}
function fromHash() {
  const m = /^#sort=([^:]+):(asc|desc)$/.exec(location.hash);
  if (m) sortBy(decodeURIComponent(m[1]), m[2]); else if (!location.hash.startsWith('#row-')) rows(D.samples);
}
start();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title><style>@CSS@</style></head>
<body>
<nav>@PREV@<b>step @STEP@</b>@NEXT@<a href="samples.jsonl">samples.jsonl</a></nav>
<h1>Rollouts of step @STEP@</h1>
<p id="summary"></p>
<h2>Best and worst of each reward</h2>
<section id="extremes"></section>
<h2>Every sample (click a column to sort)</h2>
<table id="samples"><thead></thead><tbody></tbody></table>
<script id="data" type="application/json">@DATA@</script>
<script>@JS@</script>
</body></html>
"""
