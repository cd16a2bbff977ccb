"""RL prompt data (spec §7.1-7.2): the real demo mix, sampled_ratio rules, seeded mixes, bad lines, the resumable
prompt sampler, and the GRPO / data configs."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from uniar_ray import config as C
from uniar_ray import data as D

@pytest.fixture(scope="module")
def demo_dir(shared_data) -> Path:
    return shared_data / "uniar" / "rl_demo"


@pytest.fixture(scope="module")
def demo(demo_dir) -> D.RLDataset:
    return D.load_dataset(demo_dir / "demo_mix.yaml")


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n: int, task: str = "general") -> list[dict]:
    return [{"instruction": f"prompt {i}", "number": i, "task": task, "metadata": {}} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# The demo data
# ----------------------------------------------------------------------------------------------------------------


def test_demo_mix_reads_all_60_records_in_yaml_order(demo, demo_dir):
    assert len(demo) == 60  # the YAML comment says 90 (50 geneval); the files hold 60 (benchmarks_spec §7.1)
    assert [r.task for r in demo.records] == ["geneval"] * 20 + ["ocr"] * 20 + ["general"] * 20
    assert [(e.name, e.total, e.sampled) for e in demo.entries] == [("geneval", 20, 20), ("ocr", 20, 20),
                                                                    ("general", 20, 20)]
    # json_path is the reference's data/rl_demo/x.jsonl; found beside the YAML by its file name
    assert [Path(e.path) for e in demo.entries] == [demo_dir / "geneval.jsonl", demo_dir / "ocr.jsonl",
                                                    demo_dir / "general.jsonl"]
    # sampled_ratio 1 keeps file order
    assert [r.number for r in demo.records[:20]] == list(range(20))
    assert all(r.line == r.number + 1 for r in demo.records)
    assert demo.summary() == "60 prompts (geneval: 20/20, ocr: 20/20, general: 20/20)"


def test_demo_records_content(demo):
    tags = Counter(r.metadata["tag"] for r in demo.records if r.task == "geneval")
    assert tags == {"position": 8, "color_attr": 4, "counting": 4, "colors": 3, "two_object": 1}
    first = demo.records[0]
    assert first == D.PromptRecord(prompt="a photo of a pink dining table", number=0, task="geneval",
                                   metadata={"tag": "colors", "include": [{"class": "dining table", "count": 1,
                                                                           "color": "pink"}], "exclude": []},
                                   source="geneval", line=1)
    assert all('"' in r.prompt for r in demo.records if r.task == "ocr")  # OCR targets are quoted spans
    assert all(r.metadata == {} for r in demo.records if r.task == "general")


def test_single_jsonl_and_default_config_path(demo, demo_dir):
    one = D.load_dataset(demo_dir / "ocr.jsonl")
    assert len(one) == 20 and one.entries[0].name == "ocr" and one.records == demo.records[20:40]
    # DataConfig's default path is a registered data name, found in the mirror (or cache)
    cfg = C.DataConfig()
    assert D.resolve_data_path(cfg.path).read_bytes() == (demo_dir / "demo_mix.yaml").read_bytes()


def test_reward_kwargs_is_a_copy(demo):
    rec = demo.records[0]
    kw = rec.reward_kwargs()
    assert kw == {"raw_prompt": rec.prompt, "task": "geneval", "metadata": rec.metadata, "number": 0}
    kw["metadata"]["prompt"] = "mutated by a reward"  # what the reference's geneval reward does
    assert "prompt" not in rec.metadata


# ----------------------------------------------------------------------------------------------------------------
# sampled_ratio and seeded mixes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,count,all_in_order", [
    (1, 10, True), (1.0, 10, True), (0.5, 5, False), (0.33, 3, False), (0.99, 9, False), (3, 3, False),
    (2.7, 2, False), (0, 0, False), (100, 10, False), (1.5, 1, False),
])
def test_sample_count_rules(value, count, all_in_order):
    assert D.sample_count(value, 10) == (count, all_in_order)


@pytest.mark.parametrize("value", [-1, -0.5, True, "all", None, float("nan"), float("inf")])
def test_sample_count_rejects(value):
    with pytest.raises(D.DataError, match="sampled_ratio"):
        D.sample_count(value, 10)


def _mix(tmp_path: Path, entries: list[dict], name="mix.yaml") -> Path:
    import yaml

    p = tmp_path / name
    p.write_text(yaml.safe_dump({"datasets": entries}))
    return p


def test_mix_sampling_is_seeded_and_follows_the_rules(tmp_path):
    _write(tmp_path / "a.jsonl", _rows(10, "general"))
    _write(tmp_path / "b.jsonl", _rows(8, "ocr"))
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "c.jsonl", _rows(6, "general"))
    mix = _mix(tmp_path, [
        {"name": "a", "json_path": "a.jsonl", "sampled_ratio": 0.5},
        {"name": "b", "json_path": "data/rl_demo/b.jsonl", "sampled_ratio": 3},  # the reference form: by file name
        {"json_path": "sub/c.jsonl", "sampled_ratio": 100},  # more than N -> all, shuffled; name = stem
    ])
    one = D.load_dataset(mix, seed=7)
    assert [(e.name, e.total, e.sampled) for e in one.entries] == [("a", 10, 5), ("b", 8, 3), ("c", 6, 6)]
    assert [r.source for r in one.records] == ["a"] * 5 + ["b"] * 3 + ["c"] * 6
    assert len({r.number for r in one.records[:5]}) == 5  # without replacement
    assert sorted(r.number for r in one.records[8:]) == list(range(6))
    # the global RNGs play no part; the same seed gives the same mix, another seed another one
    random.seed(1)
    np.random.seed(1)
    again = D.load_dataset(mix, seed=7)
    assert again.records == one.records
    others = [D.load_dataset(mix, seed=s).records for s in range(8, 12)]
    assert any(o != one.records for o in others)
    # changing one entry leaves the other entries' samples alone
    mix2 = _mix(tmp_path, [
        {"name": "a", "json_path": "a.jsonl", "sampled_ratio": 0.5},
        {"name": "b", "json_path": "b.jsonl", "sampled_ratio": 1},
        {"json_path": "sub/c.jsonl", "sampled_ratio": 100},
    ], "mix2.yaml")
    two = D.load_dataset(mix2, seed=7)
    assert two.records[:5] == one.records[:5] and two.records[-6:] == one.records[-6:]


@pytest.mark.parametrize("entries,match", [
    ([{"json_path": "missing.jsonl", "sampled_ratio": 1}], r"not found; tried .*missing.jsonl"),
    ([{"json_path": "a.jsonl"}], "'sampled_ratio' is missing"),
    ([{"json_path": "a.jsonl", "sampled_ratio": -2}], r"datasets\[0\].sampled_ratio=-2"),
    ([{"json_path": "a.jsonl", "sampled_ratio": 1, "ratio": 2}], r"unknown keys \['ratio'\]"),
    ([], "non-empty 'datasets'"),
    ([{"json_path": "a.jsonl", "sampled_ratio": 0}], "no prompts"),
])
def test_bad_mixes(tmp_path, entries, match):
    _write(tmp_path / "a.jsonl", _rows(3))
    with pytest.raises(D.DataError, match=match):
        D.load_dataset(_mix(tmp_path, entries))


def test_bad_data_paths(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(D.DataError, match="must end in .jsonl"):
        D.load_dataset(tmp_path / "x.json")
    with pytest.raises(D.DataError, match="not found"):
        D.load_dataset(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Bad lines
# ----------------------------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"instruction": "ok", "number": 1', "not valid JSON"),
    ('["instruction", "number"]', "expected a JSON object"),
    ('{"number": 2}', "'instruction' must be a non-empty string"),
    ('{"instruction": "x", "task": "ocr"}', "'number' is missing"),
    ('{"instruction": "x", "number": "3"}', "'number' must be an integer"),
    ('{"instruction": "x", "number": 4, "metadata": [1]}', "'metadata' must be an object"),
    ('{"instruction": "x", "number": 5, "task": 3}', "'task' must be a string"),
    ('{"instruction": "x", "number": 6, "task": "geneval", "metadata": {"tag": "single_object", '
     '"include": ["cat"]}}', "items must be objects with a 'class'"),  # the form docs/training_rl.md shows
    ('{"instruction": "x", "number": 7, "task": "geneval", "metadata": {"include": []}}', "string 'tag'"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, line, reason):
    p = _write(tmp_path / "d.jsonl", [_rows(1)[0], "", line])  # the blank line 2 is ignored
    with pytest.raises(D.DataError, match=rf"d\.jsonl:3: .*{reason}"):
        D.read_jsonl(p)


def test_skip_bad_lines_skips_and_counts(tmp_path):
    rows = _rows(4)
    p = _write(tmp_path / "d.jsonl", [rows[0], BAD_LINES[0][0], rows[1], "   ", BAD_LINES[3][0], rows[2], rows[3]])
    mix = _mix(tmp_path, [{"name": "d", "json_path": "d.jsonl", "sampled_ratio": 1}])
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: .*skip_bad_lines"):
        D.load_dataset(mix)
    ds = D.load_dataset(mix, skip_bad_lines=True)
    assert [r.number for r in ds.records] == [0, 1, 2, 3] and [r.line for r in ds.records] == [1, 3, 6, 7]
    assert [(b.line, b.path) for b in ds.bad_lines] == [(2, str(p)), (5, str(p))]
    assert ds.entries[0].total == 4 and "2 bad lines skipped" in ds.summary()
    single = D.load_dataset(p, skip_bad_lines=True)
    assert len(single) == 4 and len(single.bad_lines) == 2


def test_prompt_key_and_optional_fields(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "a cat", "number": 0}, {"prompt": "a dog", "number": 1,
                                                                          "task": None, "metadata": None}])
    recs = D.read_jsonl(p, prompt_key="prompt")
    assert [(r.prompt, r.task, r.metadata) for r in recs] == [("a cat", None, {}), ("a dog", None, {})]
    with pytest.raises(D.DataError, match="'instruction' must be"):
        D.read_jsonl(p)


# ----------------------------------------------------------------------------------------------------------------
# The prompt sampler
# ----------------------------------------------------------------------------------------------------------------


def test_sampler_epochs_cover_every_record_once(demo):
    s = D.PromptSampler(demo.records, prompts_per_step=8, seed=42)
    batches = [s.next_batch() for _ in range(15)]  # 120 prompts = 2 epochs of 60
    assert all(len(b) == 8 for b in batches)
    flat = [r for b in batches for r in b]
    for epoch in (flat[:60], flat[60:]):
        assert sorted((r.source, r.number) for r in epoch) == sorted((r.source, r.number) for r in demo.records)
    assert flat[:60] != flat[60:] and flat[:60] != demo.records  # reshuffled every epoch
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["offset"] == 0


def test_sampler_state_round_trip_is_exact(demo):
    run = D.PromptSampler(demo.records, prompts_per_step=7, seed=3)
    for _ in range(11):  # mid-epoch (77 = 60 + 17)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint holds
    assert set(state) >= {"epoch", "offset", "seed"} and (state["epoch"], state["offset"]) == (1, 17)
    resumed = D.PromptSampler(demo.records, prompts_per_step=7, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(20)] == [run.next_batch() for _ in range(20)]


def test_sampler_refuses_a_changed_dataset_and_bad_states(demo):
    s = D.PromptSampler(demo.records, prompts_per_step=4, seed=1)
    state = s.state_dict()
    with pytest.raises(D.DataError, match="fingerprint"):
        D.PromptSampler(demo.records[:-1] + demo.records[:1], 4, seed=1).load_state_dict(state)
    with pytest.raises(D.DataError, match="seed=1"):
        D.PromptSampler(demo.records, 4, seed=2).load_state_dict(state)
    with pytest.raises(D.DataError, match="out of range"):
        D.PromptSampler(demo.records, 4, seed=1).load_state_dict({**state, "offset": 60})
    with pytest.raises(D.DataError, match="prompts_per_step"):
        D.PromptSampler(demo.records, 0)


def test_sampler_without_shuffle_and_with_more_prompts_than_records(tmp_path):
    recs = D.read_jsonl(_write(tmp_path / "d.jsonl", _rows(3)))
    s = D.PromptSampler(recs, prompts_per_step=4, shuffle=False)
    assert [r.number for r in s.next_batch()] == [0, 1, 2, 0]
    assert [r.number for r in s.next_batch()] == [1, 2, 0, 1]
    assert [r.number for r in s.next_batch()] == [2, 0, 1, 2]
    assert (s.epoch, s.offset) == (4, 0)
    shuffled = D.PromptSampler(recs, prompts_per_step=7, seed=5).next_batch()
    assert Counter(r.number for r in shuffled[:6]) == {0: 2, 1: 2, 2: 2}


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def test_grpo_config_defaults_are_the_reference_launch_values():
    c = C.GRPOConfig()
    want = dict(learning_rate=5e-6, lr_scheduler_type="linear", warmup_steps=0, beta=0.01, num_generations=16,
                temperature=1.0, epsilon=0.2, epsilon_high=None, delta=None, importance_sampling_level="token",
                scale_rewards="group", loss_type="grpo", loss_use_float=True, logits_use_temperature=True,
                bsq_loss_normalize=False, max_completion_length=256, decode_num_inference_steps=14,
                decode_cfg_scale=1.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                weight_decay=0.0, seed=42, num_iterations=1, vllm_importance_sampling_correction=True,
                vllm_importance_sampling_cap=2.0)
    assert {k: getattr(c, k) for k in want} == want


@pytest.mark.parametrize("override,match", [
    ("num_generations=1", "at least 2"), ("loss_type=ppo", "loss_type"), ("scale_rewards=sometimes", "scale_rewards"),
    ("delta=0.9", "delta"), ("epsilon=1.5", "epsilon"), ("temperature=0", "temperature"), ("beta=-1", "beta"),
    ("importance_sampling_level=image", "importance_sampling_level"), ("all_nan_rewards=drop", "all_nan_rewards"),
    ("vllm_importance_sampling_cap=0", "cap"), ("lr_scheduler_type=cosine", "lr_scheduler_type"),
    ("adam_beta2=1", "adam_beta"), ("epsilon_high=-0.1", "epsilon_high"),
])
def test_grpo_config_rejects(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(C.GRPOConfig, None, [override])


def test_grpo_config_yaml_spellings(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("scale_rewards: false\nepsilon_high: 0.28\ndelta: 4\nloss_type: dapo\n")
    c = C.load_config(C.GRPOConfig, f)
    assert (c.scale_rewards, c.epsilon_high, c.delta, c.loss_type) == ("none", 0.28, 4.0, "dapo")
    assert C.GRPOConfig(scale_rewards=True).scale_rewards == "group"


def test_data_config_validation():
    with pytest.raises(C.ConfigError, match="must end in"):
        C.DataConfig(path="prompts.txt")
    with pytest.raises(C.ConfigError, match="prompts_per_step"):
        C.load_config(C.DataConfig, None, ["prompts_per_step=0"])
    assert C.load_config(C.DataConfig, None, ["skip_bad_lines=true", "path=x.yml"]).skip_bad_lines


def test_mix_entries_draw_independently(tmp_path):
    _write(tmp_path / "a.jsonl", _rows(20))
    _write(tmp_path / "b.jsonl", _rows(20))
    mix = _mix(tmp_path, [{"name": "a", "json_path": "a.jsonl", "sampled_ratio": 5},
                          {"name": "b", "json_path": "b.jsonl", "sampled_ratio": 5}])
    recs = D.load_dataset(mix, seed=0).records
    assert [r.number for r in recs[:5]] != [r.number for r in recs[5:]]
