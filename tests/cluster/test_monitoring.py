"""The shipped Grafana dashboard: valid JSON, one query per panel at least, and every uniar_* metric it charts is one
the code exports (Ray adds the ``ray_`` prefix, counters get ``_total``); the GRPO gauges are checked on a live
cluster in test_cluster.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "grafana" / "uniar.json"


def dashboard_metrics() -> set[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    assert d["panels"] and all(p["targets"] for p in d["panels"])
    return {m.removesuffix("_total") for e in exprs for m in re.findall(r"ray_(uniar_\w+)", e)}


def exported_names() -> set[str]:
    source = "\n".join(p.read_text() for p in (REPO / "actors").glob("*.py"))
    return set(re.findall(r"""["'](uniar_(?!grpo_)\w+)["']""", source))


def test_dashboard_charts_only_metrics_the_code_exports():
    charted = dashboard_metrics()
    fixed = {m for m in charted if not m.startswith("uniar_grpo_")}  # uniar_grpo_<metric key>: made per step
    assert {"uniar_rollout_tokens_per_s", "uniar_decoder_pool_images_per_s", "uniar_reward_mean",
            "uniar_reward_call_seconds"} <= fixed
    assert fixed <= exported_names(), fixed - exported_names()
    assert {"uniar_grpo_reward_mean", "uniar_grpo_time_sync", "uniar_grpo_excluded_groups"} <= charted


def test_dashboard_charts_the_train_rollout_gap_under_the_names_the_job_exports():
    import torch

    from jobs.grpo_parts import gauge_name
    from uniar_ray.grpo import rollout_gap

    keys = rollout_gap(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4), cap=2.0)  # the trainer's metric keys
    assert {gauge_name(f"train/{k}") for k in keys} <= dashboard_metrics()  # the driver adds train/
