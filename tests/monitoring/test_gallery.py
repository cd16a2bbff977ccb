"""Every sample inspectable (uniar_ray/gallery.py): the records and PNGs of a dumped step, and its gallery page as
headless Chromium renders it from the file system: every image loaded, one table row per sample, sorting by a reward
and by the advantage, the best and worst on top, links between dumped steps that follow a resume's truncation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from uniar_ray import gallery
from uniar_ray.rollout.types import Rollout

G = 4


class _Record:
    def __init__(self, prompt, task, metadata=None):
        self.prompt, self.task, self.metadata = prompt, task, metadata or {}


class _Batch:
    """The shape of jobs.grpo_parts._Batch the gallery reads: rollouts, G per prompt, and their prompt records."""

    def __init__(self, records, rollouts):
        self.records, self.rollouts = records, rollouts

    def record_of(self, i):
        return self.records[i // G]


def make_step(step: int, seed: int = 0):
    """2 prompts x 4 samples: a colour reward on all, an OCR reward on the text prompt only (NaN on the other), a
    decode failure (no image; its group excluded), numpy values and NaN in the details, a prompt that is HTML."""
    rng = np.random.default_rng(seed)
    records = [_Record('a red cube </script><b id="injected">x</b>', "geneval", {"include": [{"class": "cube"}]}),
               _Record("the word 'RAY' on a sign", "ocr")]
    rollouts, images = [], []
    for i in range(2 * G):
        color, ocr = float(rng.uniform()), (float(rng.uniform()) if i >= G else math.nan)
        r = Rollout(request_id=f"s{step}-p{i // G}-g{i % G}", prompt=records[i // G].prompt,
                    prompt_ids=np.zeros(3, np.int32), ar_height=64, ar_width=64, bits_shape=(1, 1, 1, 8),
                    bits_packed=np.zeros(1, np.uint8), logprobs=None, seed=1000 + i, weight_version=step,
                    group=i // G, task=records[i // G].task,
                    rewards={"target_color": color, "ocr": ocr},
                    reward_details={"target_color": {"distance": np.float32(1 - color)},
                                    "ocr": {"text": "RAY", "conf": math.nan}},
                    reward=color + (0 if math.isnan(ocr) else ocr), advantage=float(rng.normal()))
        rollouts.append(r)
        images.append(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    images[2] = None  # its decode failed: the sample, and so its group, is left out
    for r in rollouts[:G]:
        r.excluded = "another sample of its group failed"
    rollouts[2].excluded, rollouts[2].reward, rollouts[2].rewards = "decode failed: timeout", math.nan, {}
    return _Batch(records, rollouts), images


def test_records_and_files(tmp_path):
    batch, images = make_step(3)
    recs = gallery.dump(tmp_path, 3, batch, images)
    folder = tmp_path / "step-000003"
    lines = (folder / "samples.jsonl").read_text().splitlines()
    assert len(lines) == len(recs) == 2 * G
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    first = parsed[G]
    assert first["prompt"] == "the word 'RAY' on a sign" and first["task"] == "ocr" and first["seed"] == 1000 + G
    assert first["weight_version"] == 3 and first["rewards"]["ocr"] == pytest.approx(batch.rollouts[G].rewards["ocr"])
    assert first["reward_details"]["target_color"]["distance"] == pytest.approx(1 - first["rewards"]["target_color"],
                                                                                 abs=1e-6)
    assert first["reward_details"]["ocr"]["conf"] is None  # NaN -> null: strict JSON
    assert first["advantage"] == pytest.approx(batch.rollouts[G].advantage) and first["excluded"] is False
    assert parsed[0]["rewards"]["ocr"] is None and parsed[0]["metadata"] == {"include": [{"class": "cube"}]}
    assert parsed[2]["image"] is None and parsed[2]["excluded_reason"] == "decode failed: timeout"
    assert parsed[1]["excluded"] and parsed[1]["excluded_reason"] == "another sample of its group failed"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:04d}.png" for i in range(2 * G) if i != 2]
    assert gallery.due(0, 10, 30) and gallery.due(9, 10, 30) and gallery.due(29, 10, 30)
    assert not gallery.due(10, 10, 30) and not gallery.due(0, 0, 30)


ROWS = "[...document.querySelectorAll('#samples tbody tr')].map(tr => +tr.dataset.index)"  # sample per row


def rows(b) -> list[int]:
    return b.evaluate(ROWS)


def test_gallery_in_chromium(tmp_path, browser):
    batch, images = make_step(0, seed=1)
    gallery.dump(tmp_path, 0, batch, images)
    later, later_images = make_step(9, seed=2)
    gallery.dump(tmp_path, 9, later, later_images)
    page = tmp_path / "step-000009" / "index.html"
    browser.open(page.as_uri())
    n = 2 * G
    assert rows(browser) == list(range(n))  # one row per sample, in sample order
    loaded = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth === 64)")
    shown = browser.evaluate("document.querySelectorAll('#samples tbody img').length")
    assert shown == n - 1 and len(loaded) > shown and all(loaded), loaded  # table + best/worst strips, all loaded
    assert browser.evaluate("document.getElementById('injected') === null")  # a prompt is text, never markup

    color = {i: r.rewards.get("target_color") for i, r in enumerate(later.rollouts)}
    by_color = sorted((i for i in color if color[i] is not None), key=lambda i: -color[i]) + [2]  # no score: last
    browser.evaluate("document.querySelector('th[data-key=\"reward:target_color\"]').click()")
    assert rows(browser) == by_color
    browser.evaluate("document.querySelector('th[data-key=\"reward:target_color\"]').click()")  # again: low first
    assert rows(browser) == by_color[:-1][::-1] + [2]
    browser.evaluate("document.querySelector('th[data-key=\"advantage\"]').click()")
    assert rows(browser) == sorted(range(n), key=lambda i: -later.rollouts[i].advantage)
    best = browser.evaluate("document.querySelector('[data-reward=\"reward:ocr\"] figcaption').textContent")
    top_ocr = max(range(G, n), key=lambda i: later.rollouts[i].rewards["ocr"])
    assert best.endswith(f"#{top_ocr}")

    browser.open(page.as_uri() + "#sort=advantage:asc")  # the sort is kept in the address
    ascending = sorted(range(n), key=lambda i: later.rollouts[i].advantage)
    browser.wait_for(f"JSON.stringify({ROWS}) === '{json.dumps(ascending, separators=(',', ':'))}'", timeout_s=30)
    browser.evaluate("document.getElementById('prev').click()")
    browser.wait_for("location.pathname.endsWith('step-000000/index.html') && "
                     "document.querySelectorAll('#samples tbody tr').length === 8", timeout_s=30)
    assert browser.evaluate("document.getElementById('next').getAttribute('href')") == "../step-000009/index.html"
    assert browser.evaluate("document.getElementById('prev').tagName") == "SPAN"  # the first dump

    assert gallery.truncate(tmp_path, 5) == 1  # a resume from step 5: the dump of step 9 will be made again
    browser.open((tmp_path / "step-000000" / "index.html").as_uri())
    assert browser.evaluate("document.getElementById('next').tagName") == "SPAN"
    assert gallery.dumped_steps(tmp_path) == [0]


def test_dump_every_config():
    from uniar_ray.config import ConfigError, GRPORunConfig, load_config
    from uniar_ray.config.grpo import RolloutDumpConfig

    assert load_config(GRPORunConfig, "configs/grpo_demo.yaml").rollouts.dump_every == 10  # make demo writes them
    assert RolloutDumpConfig().dump_every == 0  # off unless asked
    with pytest.raises(ConfigError, match="rollouts.dump_every=-1"):
        load_config(GRPORunConfig, "configs/grpo_demo.yaml", ["rollouts.dump_every=-1"])
