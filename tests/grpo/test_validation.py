"""Validation during GRPO training without Ray (jobs/grpo_validation.py): held-out prompts never reach training, the
schedule (start, every N, end), fixed seeds, the val/* figures, reuse after a resume, the second curve."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from jobs import grpo_validation as V
from uniar_ray import data as D
from uniar_ray.config import ConfigError, GRPORunConfig, ValidationConfig, load_config
from uniar_ray.rollout import Rollout
from uniar_ray.runlog import RunDir


def _records(n: int, dup: int = 0) -> list[D.PromptRecord]:
    out = [D.PromptRecord(prompt=f"prompt {i}", number=i, task="general") for i in range(n)]
    return out + [D.PromptRecord(prompt="prompt 0", number=100 + i) for i in range(dup)]


def test_hold_out_is_seeded_disjoint_and_keeps_copies_together():
    recs = _records(40, dup=2)  # "prompt 0" three times
    kept, held = D.hold_out(recs, 6, seed=7)
    assert (kept, held) == D.hold_out(recs, 6, seed=7)
    assert {r.prompt for r in kept}.isdisjoint({r.prompt for r in held})
    assert len({r.prompt for r in held}) == 6 and len(kept) + len(held) == len(recs)
    assert [r.number for r in held] == sorted(r.number for r in held)  # load order
    assert D.hold_out(recs, 6, seed=8)[1] != held
    others = D.hold_out(_records(40, dup=2), 1, seed=0)  # a copy of a held-out prompt is held out too
    assert all(r.prompt != others[1][0].prompt for r in others[0])
    assert D.hold_out(recs, 0) == (recs, [])
    with pytest.raises(D.DataError, match="validation.holdout=42.*only 42"):
        D.hold_out(recs, 42)


@pytest.mark.parametrize("bad, match", [
    (dict(every=5), "needs validation prompts"),
    (dict(holdout=4, prompt_file="x.jsonl"), "choose one"),
    (dict(prompt_file="x.txt"), "must end in .jsonl"),
    (dict(num_generations=0), "num_generations"),
    (dict(every=-1), "every"),
])
def test_validation_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        ValidationConfig(**bad)


def _cfg(**validation) -> GRPORunConfig:
    overrides = [f"validation.{k}={v}" for k, v in validation.items()]
    return load_config(GRPORunConfig, "configs/grpo_demo.yaml", ["steps=7", "grpo.num_generations=2",
                                                                 "data.prompts_per_step=2", *overrides])


class FakeParts:
    """generate / decode / score as Parts has them: a sample's image is a constant colour set by the policy's
    ``red`` level and the sample's seed, scored by its redness; one sample's decode fails."""

    def __init__(self):
        self.red, self.calls, self.seeds = 0.0, 0, []

    def generate(self, reqs):
        self.calls += 1
        self.seeds.append([r.seed for r in reqs])
        return [Rollout(request_id=r.request_id, prompt=r.prompt, prompt_ids=np.zeros(1, np.int32), ar_height=32,
                        ar_width=32, bits_shape=(1, 1, 1, 8), bits_packed=np.zeros(1, np.uint8), logprobs=None,
                        seed=r.seed) for r in reqs]

    def decode(self, batch):
        batch.rollouts[1].excluded = "decode failed: injected"
        return [None if i == 1 else np.full((4, 4, 3), min(255, int(self.red * 255 + r.seed % 7)), np.uint8)
                for i, r in enumerate(batch.rollouts)]

    def score(self, batch, images, m):
        for r, im in zip(batch.rollouts, images):
            if im is not None:
                r.rewards = {"target_color": float(im[0, 0, 0]) / 255}


def test_validator_schedule_seeds_figures_and_reuse(tmp_path, capsys):
    cfg = _cfg(every=3, holdout=4, num_generations=2)
    held = D.hold_out(D.load_dataset(cfg.data.path).records, 4, seed=cfg.data.seed)[1]
    run = RunDir(tmp_path / "run").open()
    parts = FakeParts()
    v = V.Validator(cfg, held, run)
    rows = {}
    for step in range(cfg.steps):
        rows[step] = v.at(parts, step)
        parts.red += 0.1
    end = v.at_end(parts)
    assert [s for s, m in rows.items() if m] == [0, 3, 6] and end["step"] == 7  # start, every 3, the end
    assert parts.calls == 4 and all(s == parts.seeds[0] for s in parts.seeds)  # the same seeds every time
    assert len(set(parts.seeds[0])) == 8
    m = rows[3]
    samples = [min(255, int(0.3 * 255 + s % 7)) / 255 for i, s in enumerate(parts.seeds[0]) if i != 1]
    assert m["val/target_color/mean"] == pytest.approx(np.mean(samples))
    assert m["val/reward_mean"] == pytest.approx(np.mean(samples))  # weight 1.0
    assert (m["val/num_samples"], m["val/num_failed"]) == (7, 1)
    assert end["val/reward_mean"] > rows[0]["val/reward_mean"]
    assert "[grpo] val     3  reward" in capsys.readouterr().out

    for step in (0, 3, 6, 7):  # the metric rows as the loop writes them, then a resume from step 3's checkpoint
        train = {"reward_mean": 0.1 * step} if step < 7 else {}
        run.log_metrics({"step": step, **train, **(rows.get(step) or end)})
    run.truncate_metrics(3)
    assert [json.loads(x)["step"] for x in run.validation_path.read_text().splitlines()] == [0, 3]
    again, fresh = FakeParts(), V.Validator(cfg, held, run)
    assert fresh.at(again, 3) == pytest.approx(rows[3]) and again.calls == 0  # recorded: not redone
    assert "not redone" in capsys.readouterr().out
    assert fresh.at(again, 6) and again.calls == 1
    other = V.Validator(_cfg(every=3, holdout=4, num_generations=2, seed=5), held, run)  # other seeds: redone
    assert other.at(again, 3) and again.calls == 2
    assert V.Validator(_cfg(every=0, holdout=4), held, run).at(again, 0) == {}  # every=0: never
    assert run.plot_rewards().stat().st_size > 0


@pytest.mark.parametrize("all_nan", ["exclude", "zero"])
def test_figures_follow_grpo_all_nan_rewards(all_nan):
    cfg = _cfg(every=1, holdout=2, num_generations=2)
    cfg.grpo.all_nan_rewards = all_nan  # zero (the reference): a row no reward applies to totals 0 and counts
    cfg.rewards.models["other"] = dataclasses.replace(cfg.rewards.models["target_color"], weight=2.0)
    rolls = [Rollout(request_id=str(i), prompt="p", prompt_ids=np.zeros(1, np.int32), ar_height=32, ar_width=32,
                     bits_shape=(1, 1, 1, 8), bits_packed=np.zeros(1, np.uint8), logprobs=None) for i in range(4)]
    rolls[0].rewards = {"target_color": 0.5, "other": 0.25}
    rolls[1].rewards = {"target_color": 0.1, "other": math.nan}  # other does not apply: total 0.1
    rolls[2].rewards = {"target_color": math.nan, "other": math.nan}  # nothing applies: 0, or left out
    rolls[3].excluded = "reward call failed"
    m = V.figures(cfg, rolls)
    assert m["val/target_color/mean"] == pytest.approx(0.3) and m["val/other/mean"] == pytest.approx(0.25)
    if all_nan == "exclude":
        assert m["val/reward_mean"] == pytest.approx((0.5 + 2 * 0.25 + 0.1) / 2)
        assert (m["val/num_samples"], m["val/num_failed"]) == (2, 1)
    else:
        assert m["val/reward_mean"] == pytest.approx((0.5 + 2 * 0.25 + 0.1 + 0.0) / 3)
        assert (m["val/num_samples"], m["val/num_failed"]) == (3, 1)


def test_prompt_file_keeps_the_training_set_and_names_overlaps(tmp_path, capsys):
    f = tmp_path / "val.jsonl"
    f.write_text(json.dumps({"instruction": "a red cube", "number": 0, "task": "general"}) + "\n"
                 + json.dumps({"instruction": "prompt 1", "number": 1}) + "\n")
    cfg = _cfg(every=2, holdout=0, prompt_file=str(f))
    train, held = V.split_prompts(cfg, _records(5))
    assert len(train) == 5 and [r.prompt for r in held] == ["a red cube", "prompt 1"]
    assert "1 of the 2 prompts of validation.prompt_file" in capsys.readouterr().err
