"""monitoring.panels without a Prometheus: the dashboard's panels and queries as Grafana reads them, its interval
variables, legends from series labels, and one PNG with a chart per panel."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from monitoring import panels


def test_panels_in_layout_order_with_rows_flattened(tmp_path):
    d = {"panels": [
        {"type": "timeseries", "title": "b", "gridPos": {"x": 12, "y": 0}, "targets": [{"expr": "up"}]},
        {"type": "row", "title": "r", "panels": [
            {"type": "timeseries", "title": "c", "gridPos": {"x": 0, "y": 9},
             "fieldConfig": {"defaults": {"unit": "s"}},
             "targets": [{"expr": "rate(x_total[$__rate_interval])", "legendFormat": "{{reward}} rate"}]}]},
        {"type": "timeseries", "title": "a", "gridPos": {"x": 0, "y": 0}, "targets": [{"expr": "up"}, {"refId": "B"}]},
    ]}
    f = tmp_path / "d.json"
    f.write_text(json.dumps(d))
    got = panels.load_panels(f)
    assert [p.title for p in got] == ["a", "b", "c"] and got[2].unit == "s"
    assert got[0].targets == [("up", "")]  # a target without an expression is not a query
    assert panels.promql(got[2].targets[0][0], step_s=2, range_s=600) == "rate(x_total[15s])"
    assert panels.promql("increase(x[$__range]) / $__interval", 30, 600) == "increase(x[600s]) / 30s"
    assert panels.legend("{{reward}} rate", {"reward": "ocr"}, "e") == "ocr rate"
    assert panels.legend("", {"reward": "ocr", "instance": "h:1"}, "e") == "{reward=ocr}"


def test_render_draws_every_panel(tmp_path):
    dash = panels.load_panels()  # the shipped dashboard
    assert len(dash) >= 12 and all(p.targets for p in dash)
    first = dash[0].targets[0][0]
    series = [{"metric": {"reward": "target_color"}, "values": [[100.0 + t, str(0.4 + 0.01 * t)] for t in range(5)]}]
    out = panels.render(dash, {first: series}, tmp_path / "p.png", "test", start=100.0)
    px = np.asarray(Image.open(out).convert("RGB"))
    rows = -(-len(dash) // 2)
    assert px.shape[0] == pytest.approx(2.3 * rows * 72, abs=2) and px.shape[1] == 11 * 72


def test_bad_range_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--last '30 minutes'"):
        panels.main(["--last", "30 minutes", "-o", str(tmp_path / "x.png")])


def test_a_missing_binary_skips_with_the_reason_outside_ci_and_fails_under_ci(monkeypatch):
    from tests.monitoring.conftest import require

    for k in ("CI", "UNIAR_REQUIRE_CLUSTER"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no-such-tool is not installed \(apt-get install -y pkg"):
        require("no-such-tool", "pkg")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI: no-such-tool is not installed"):
        require("no-such-tool", "pkg")
