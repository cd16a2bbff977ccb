"""The Grafana dashboard (grafana/uniar.json) without Grafana: every panel's queries evaluated through Prometheus'
HTTP API over a time range and drawn into one PNG, two panels a row as the dashboard lays them out.

    python -m monitoring.panels --prometheus http://127.0.0.1:9090 --last 30m -o dashboard.png
    python -m monitoring.panels --prometheus URL --start 1767600000 --end 1767600600 -o run.png

On a cluster: ``ray attach cluster.yaml -p 9090``, ``ray metrics launch-prometheus`` on the head, then the first
command on your machine (README "Monitoring").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "uniar.json"


@dataclasses.dataclass
class Panel:
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL expression, legend format)


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels in layout order (rows' inner panels included), each with its queries."""
    d = json.loads(Path(path).read_text())
    flat = []
    for p in d["panels"]:
        flat += p.get("panels", []) if p.get("type") == "row" else [p]
    flat.sort(key=lambda p: (p.get("gridPos", {}).get("y", 0), p.get("gridPos", {}).get("x", 0)))
    return [Panel(p.get("title", ""), p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                  [(t["expr"], t.get("legendFormat", "")) for t in p.get("targets", []) if t.get("expr")])
            for p in flat]


def promql(expr: str, step_s: float, range_s: float) -> str:
    """Grafana's built-in interval variables replaced as Grafana would for a graph of that step and range."""
    rate = f"{max(int(4 * step_s), 15)}s"  # $__rate_interval: at least 4 scrapes
    return (expr.replace("$__rate_interval", rate).replace("${__rate_interval}", rate)
            .replace("$__interval", f"{int(max(step_s, 1))}s").replace("$__range", f"{int(max(range_s, 1))}s"))


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if not fmt:
        return "{" + ", ".join(f"{k}={v}" for k, v in labels.items() if k not in ("instance", "job")) + "}" \
            if labels else expr
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def evaluate(prom, panels: list[Panel], start: float, end: float, step_s: float) -> dict[str, list[dict]]:
    """Every query's series over [start, end]: {expression: Prometheus' query_range result}."""
    return {expr: prom.query_range(promql(expr, step_s, end - start), start, end, step_s)
            for p in panels for expr, _ in p.targets}


def render(panels: list[Panel], results: dict[str, list[dict]], out: Path, title: str, start: float) -> Path:
    """One PNG: a small chart per panel, its series against seconds since ``start``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, rows = 2, math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.3 * rows), dpi=72, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for expr, fmt in panel.targets:
            for series in results.get(expr, []):
                t = [float(v[0]) - start for v in series["values"]]
                y = [float(v[1]) for v in series["values"]]
                ax.plot(t, y, marker=".", markersize=3, linewidth=1,
                        label=legend(fmt, series.get("metric", {}), expr)[:40])
        ax.set_title(panel.title + (f" ({panel.unit})" if panel.unit not in ("", "none", "short") else ""),
                     fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    span = max((float(v[0]) - start for r in results.values() for series in r for v in series["values"]), default=1)
    for ax in axes.flat:  # one time axis for all, as in Grafana
        ax.set_xlim(0, span)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", default=str(DASHBOARD))
    ap.add_argument("--last", default="30m", help="the range ending now: 90s, 30m, 2h (ignored with --start)")
    ap.add_argument("--start", type=float, help="unix seconds")
    ap.add_argument("--end", type=float, help="unix seconds (default: now)")
    ap.add_argument("--step", type=float, default=0, help="seconds between points (default: range / 300, >= 1)")
    ap.add_argument("-o", "--out", default="dashboard.png")
    args = ap.parse_args(argv)
    end = args.end or time.time()
    m = re.fullmatch(r"(\d+)([smh])", args.last)
    if args.start is None and not m:
        raise SystemExit(f"[panels] --last {args.last!r}: give a number and s, m or h, e.g. 30m")
    start = args.start if args.start is not None else end - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    step = args.step or max(1.0, (end - start) / 300)
    panels = load_panels(Path(args.dashboard))
    from monitoring.stack import PrometheusAPI, StackError

    try:
        results = evaluate(PrometheusAPI(args.prometheus), panels, start, end, step)
    except (StackError, OSError) as e:
        raise SystemExit(f"[panels] {args.prometheus}: {e}") from None
    out = render(panels, results, Path(args.out), f"{Path(args.dashboard).name} from {args.prometheus}", start)
    print(out)
    return out


if __name__ == "__main__":
    main()
