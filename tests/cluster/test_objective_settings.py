"""ObjectiveConfig from app.yaml and the CLI: overrides applied, bad input refused by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.selector.objective import ObjectiveConfig
from cluster.selector.objective_settings import objective_from_mapping, parse_assignments
from cluster.selector.server import _parse_args, objective_from_args
from cluster.serve.app_config import AppConfig, SelectorSettings


def test_mapping_overrides_and_keeps_the_other_defaults() -> None:
    cfg = objective_from_mapping({"alpha_load": 5, "w": [1, 2, 3, 4], "learn": True})
    assert cfg.alpha_load == 5.0 and isinstance(cfg.alpha_load, float)
    assert cfg.w == (1.0, 2.0, 3.0, 4.0) and cfg.learn is True
    assert cfg.gamma == ObjectiveConfig().gamma


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"alpha_lod": 1.0}, "alpha_lod"),
        ({"alpha_load": -1.0}, "alpha_load"),
        ({"prefill_tokens_per_s": 0}, "prefill_tokens_per_s"),
        ({"gamma": 1.5}, "gamma"),
        ({"temperature": "hot"}, "temperature"),
        ({"reward_window": 2.5}, "reward_window"),
        ({"w": [1, 2, 3]}, "w"),
        ({"w": [1, -2, 3, 4]}, "w"),
        ({"learn": "yes"}, "learn"),
    ],
)
def test_bad_values_are_refused_naming_the_field(values: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        objective_from_mapping(values)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="host_weight"):
        ObjectiveConfig(host_weight=2.0)


def test_app_yaml_selector_section_sets_the_service_objective() -> None:
    app = AppConfig(selector={"objective": {"alpha_load": 4.0}, "learn": True})  # type: ignore[arg-type]
    cfg = app.selector.objective_config()
    assert cfg.alpha_load == 4.0 and cfg.learn
    with pytest.raises(ValidationError, match="alpha_loa"):
        SelectorSettings(objective={"alpha_loa": 4.0})


def test_cli_objective_settings() -> None:
    assert parse_assignments(["alpha_load=2", "w=[0,0,1,0]"]) == {
        "alpha_load": 2,
        "w": [0, 0, 1, 0],
    }
    cfg = objective_from_args(["alpha_load=2"], learn=True)
    assert cfg.alpha_load == 2.0 and cfg.learn
    ns = _parse_args(["--objective", "prefill_tokens_per_s=250", "--port", "0"])
    assert ns.objective_config.prefill_tokens_per_s == 250.0
    with pytest.raises(SystemExit):
        _parse_args(["--objective", "alpha_load"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["=3"])
