"""Config: YAML + --set overrides → pydantic, with errors that name the bad key and the fix."""

import pytest

from imgscore.tasks.config import build_config, load_config, parse_override
from imgscore.tasks.errors import ConfigError


def test_set_values_are_parsed_to_field_types():
    cfg = build_config(
        {"input": {"root": "/data"}},
        [
            "run.shard_size=250",
            "run.max_error_rate=0.05",
            "run.skip_scored=true",
            "preprocess.mean=[0.5, 0.5, 0.5]",
            "model.classes=[cat, dog]",
            "run.run_id=20260101",  # a number given to a string field stays text
        ],
    )
    assert cfg.run.shard_size == 250 and isinstance(cfg.run.shard_size, int)
    assert cfg.run.max_error_rate == pytest.approx(0.05)
    assert cfg.run.skip_scored is True
    assert cfg.preprocess.mean == [0.5, 0.5, 0.5]
    assert cfg.model.classes == ["cat", "dog"]
    assert cfg.run.run_id == "20260101"
    assert str(cfg.input.root) == "/data"


def test_override_wins_over_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  shard_size: 10\ninference:\n  batch_size: 8\n")
    cfg = load_config(p, ["inference.batch_size=16"])
    assert (cfg.run.shard_size, cfg.inference.batch_size) == (10, 16)


def test_unknown_key_names_the_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.arc'; did you mean model.arch\?"):
        build_config({}, ["model.arc=resnet50"])


def test_unknown_section_lists_valid_sections():
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*valid keys here: input, model"):
        build_config({"modle": {"arch": "x"}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"run.shard_size.*'many'"):
        build_config({}, ["run.shard_size=many"])


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_override("input.root")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("model..arch=x")


def test_checkpoint_and_weights_are_exclusive():
    with pytest.raises(ConfigError, match="set only one"):
        build_config({"model": {"checkpoint": "a.pt", "weights": "DEFAULT"}})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    demo = load_config("configs/demo.yaml")
    nightly = load_config("configs/nightly.yaml")
    assert demo.model.arch == "resnet18" and demo.preprocess.crop == 64
    assert nightly.run.skip_scored is True


def test_imgscore_config_lists_every_key_with_default_and_meaning(capsys):
    """`imgscore config` is generated from the models: every field of every section, with its
    default and a description; the README's key table names every key too (alone, or in a row of
    its section such as `preprocess.resize`, `crop`, …)."""
    import re
    from pathlib import Path

    from imgscore.flows.cli import main as cli_main
    from imgscore.tasks.config import Config, config_reference

    rows = config_reference()
    keys = [r["key"] for r in rows]
    sections = [(sec, f) for sec, f in Config.model_fields.items() if sec != "models"]  # models: a list of model blocks, one key
    assert keys == [k for sec, f in Config.model_fields.items()
                    for k in ([sec] if sec == "models" else [f"{sec}.{name}" for name in f.annotation.model_fields])]
    assert len(keys) == 1 + sum(len(f.annotation.model_fields) for _, f in sections)
    assert all(r["meaning"] for r in rows), [r["key"] for r in rows if not r["meaning"]]
    by_key = {r["key"]: r for r in rows}
    assert (by_key["run.min_errors"]["default"], by_key["run.retry_failed"]["default"], by_key["input.root"]["default"]) == ("5", "false", "–")
    assert cli_main(["config"]) == 0
    printed = capsys.readouterr().out
    assert all(k in printed for k in keys)
    assert cli_main(["config", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.count("\n| `") == len(keys)

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Configuration", 1)[1].split("### Outputs", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    missing = []
    for key in keys:
        section, _, name = key.partition(".")
        if not any(f"`{key}`" in cell or (f"`{section}." in cell and re.search(rf"`{name}`|\b{name}\b", cell)) for cell in first_cells):
            missing.append(key)
    assert not missing, f"README config table lacks {missing} (imgscore config --format markdown lists them)"
