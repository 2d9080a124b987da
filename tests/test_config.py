"""Registries and dataclass configs: duplicate names, strict loading, type-checked overrides, presets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cirlab.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from cirlab.registry import Registry


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    bf16: bool = False
    note: str | None = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def test_registry_rejects_duplicates_and_lists():
    reg: Registry = Registry("thing")

    @reg.register("b")
    def b(): ...

    reg.add("a", object())
    assert reg.list() == ["a", "b"] and reg.list("b*") == ["b"] and "a" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", object())
    with pytest.raises(KeyError, match="registered: a, b"):
        reg.get("zzz")


def test_overrides_are_type_checked():
    cfg = apply_overrides(Run(), ["optim.lr=3e-4", "steps=5", "bf16=true", "name=hello world", "tags=[a, b]"])
    assert cfg.optim.lr == 3e-4 and cfg.steps == 5 and cfg.bf16 is True and cfg.name == "hello world"
    assert cfg.tags == ["a", "b"]
    assert apply_overrides(Run(), ["note=null"]).note is None
    assert apply_overrides(Run(), ["note=123"]).note == "123"
    assert apply_overrides(Run(), ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key"),
        ("stepz=1", "unknown config key"),
        ("steps=1.5", "expected an integer"),
        ("steps=abc", "expected an integer"),
        ("bf16=3", "expected true/false"),
        ("optim=1", "expected a mapping"),
        ("steps.x=1", "has no sub-keys"),
        ("steps", "key=value"),
        ("optim.betas=[1, 2, 3]", "expected 2 items"),
    ],
)
def test_bad_overrides_raise(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Run(), [override])


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"optim\.momentum"):
        from_dict(Run, {"optim": {"momentum": 0.9}})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_preset_round_trip(tmp_path, suffix):
    cfg = apply_overrides(Run(), ["optim.lr=0.5", "tags=[x]"])
    path = tmp_path / f"preset{suffix}"
    save_config(cfg, path)
    assert load_config(Run, path) == cfg


def test_malformed_preset_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"steps": "many"}))
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_config(Run, path)


@given(st.integers(min_value=-(10**9), max_value=10**9), st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_numeric_overrides_round_trip(steps, lr):
    cfg = apply_overrides(Run(), [f"steps={steps}", f"optim.lr={lr!r}"])
    assert cfg.steps == steps and cfg.optim.lr == pytest.approx(lr)
    assert from_dict(Run, to_dict(cfg)) == cfg
