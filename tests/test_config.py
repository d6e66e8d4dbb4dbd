"""The typed training config: every unknown key, enum value, range and type is refused with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tympan.data import Manifest, Record
from tympan.errors import TympanError
from tympan.train.config import (
    DEFAULTS,
    ConfigError,
    check_model_overrides,
    load_config,
    parse_config,
    save_config,
)
from tympan.train.data import select_records

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fsdd_ssast_tiny.yaml"
MINIMAL = {"model": {"id": "ssast-tiny-frame"}, "data": {"datafile": "x.json"}}


def _refused(overrides: list[str], key: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(RECIPE, overrides)
    message = str(info.value)
    assert key in message and "\n" not in message, message
    assert isinstance(info.value, TympanError)
    return message


def test_typo_in_a_range_selection_is_refused_not_ignored(tmp_path):
    # `mn` used to be ignored, so the training range became take <= 13 and swallowed the validation takes
    _refused(["data.train={take: {mn: 10, max: 13}}"], "data.train.take")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("{take: {min: 10, max: 49}}", "{take: {mn: 10, max: 49}}"))
    with pytest.raises(ConfigError, match="mn"):
        load_config(recipe)
    records = Manifest([Record(f"{i}.wav", extra={"take": i}) for i in range(20)])
    with pytest.raises(ConfigError, match="data.train.take"):
        select_records(records, {"take": {"mn": 10, "max": 13}}, "data.train")
    assert len(select_records(records, {"take": {"min": 10, "max": 13}}, "data.train")) == 4
    with pytest.raises(ConfigError, match="tkae"):
        select_records(records, {"tkae": {"min": 10}}, "data.train")
    with pytest.raises(ConfigError, match="min 13 is above max 10"):
        load_config(RECIPE, ["data.valid={take: {min: 13, max: 10}}"])


@pytest.mark.parametrize("override, key", [
    ("model.overrides.dpeth=2", "model.overrides.dpeth"),
    ("model.overrides={depht: 2}", "model.overrides.depht"),
    ("model.overrides.embed_dim=1000000000", "model.overrides.embed_dim"),
    ("model.overrides.depth=two", "model.overrides.depth"),
    ("model.id=ssast-tiny-frme", "model.overrides"),
    ("train.epoch=3", "train.epoch"),
    ("eval.metric=f1", "eval.metric"),
    ("objective.kind=focal", "objective.kind"),
    ("objective.distill.loss=mse", "objective.distill.loss"),
    ("augment.freqm=-5", "augment.freqm"),
    ("augment.mixup=1.5", "augment.mixup"),
    ("augment.gain_db=[10, -6]", "augment.gain_db"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr='3e-3'", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.seed=abc", "train.seed"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.progress=maybe", "train.progress"),
    ("data.clip_seconds=1.2s", "data.clip_seconds"),
    ("data.clip_seconds=0", "data.clip_seconds"),
    ("data.balanced={scal: 3}", "data.balanced.scal"),
    ("data.datafile=5", "data.datafile"),
    ("output.dir=''", "output.dir"),
    ("schedule.milestones=[1, x]", "schedule.milestones"),
    ("train=3", "train"),
    ("nonsense", "nonsense"),
])  # fmt: skip
def test_bad_values_are_refused_with_the_key(override, key):
    _refused([override], key)


def test_teacher_overrides_are_checked_against_the_teacher_model():
    teacher = "objective.teacher={kind: tympan, id: ssast-tiny-frame, overrides: {dpth: 1}}"
    _refused(["objective.kind=distill", teacher], "objective.teacher.overrides.dpth")
    ok = "objective.teacher={kind: tympan, id: ssast-tiny-frame, overrides: {depth: 1}}"
    assert load_config(RECIPE, ["objective.kind=distill", ok])["objective"]["teacher"]["overrides"] == {"depth": 1}


def test_yaml_numbers_follow_yaml_1_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("lr: 1.0e-3", "lr: 3e-3"))
    assert load_config(recipe)["optim"]["lr"] == 3e-3  # PyYAML's YAML 1.1 reads '3e-3', a string
    assert load_config(RECIPE, ["optim.lr=3e-4"])["optim"]["lr"] == 3e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {id: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_every_recipe_loads_and_saved_configs_reload(tmp_path):
    import yaml

    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        if not set(yaml.safe_load(recipe.read_text())) <= set(DEFAULTS):
            continue  # not a `tympan train` recipe (recipes/default_model.yaml drives its own scripts)
        config = load_config(recipe)
        assert load_config(save_config(config, tmp_path / recipe.name)) == config


def test_model_override_checks_fit_a_sidecar_config():
    assert check_model_overrides("ssast-tiny-frame", {"depth": 2, "drop_path_rate": 0.1}) == {"depth": 2,
                                                                                             "drop_path_rate": 0.1}
    with pytest.raises(ConfigError, match="input_tdim"):
        check_model_overrides("ssast-tiny-frame", {"input_tdim": 10**12}, "sidecar")
    with pytest.raises(ConfigError, match="would hold"):  # within each entry's bound, absurd together
        check_model_overrides("ssast-tiny-frame", {"embed_dim": 200_000, "num_heads": 1}, "sidecar")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=8))  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)  # fmt: skip


def _known_keys() -> st.SearchStrategy[str]:
    keys = [f"{s}.{k}" for s, section in DEFAULTS.items() for k in section]
    return st.sampled_from(keys)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_known_keys(), _values, max_size=4))
def test_random_values_give_a_config_or_a_config_error(values):
    nested: dict = {"model": {"id": "ssast-tiny-frame"}, "data": {"datafile": "x.json"}}
    for dotted, value in values.items():
        section, key = dotted.split(".")
        nested.setdefault(section, {})
        if isinstance(nested[section], dict):
            nested[section][key] = value
    try:
        config = parse_config(nested)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    again = parse_config(config.to_dict())
    assert again == config


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_random_override_strings_give_a_config_or_a_config_error(overrides):
    try:
        load_config(RECIPE, overrides)
    except ConfigError as err:
        assert "\n" not in str(err)


def test_minimal_config_keeps_defaults():
    config = parse_config(MINIMAL)
    assert config.train.seed == 0 and config.optim.lr == DEFAULTS["optim"]["lr"]
