"""Config: YAML + --set overrides → pydantic, with errors that name the bad key and the fix."""

import pytest

from imgscore.config.loading import build_config, load_config, parse_override
from imgscore.errors import ConfigError


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
    default and a description; docs/configuration.md holds exactly that table (its generated
    block), so it names every key too."""
    import re

    from imgscore.config.schema import Config, config_reference
    from imgscore.flows.cli import main as cli_main

    rows = config_reference()
    keys = [r["key"] for r in rows]
    sections = [
        (sec, f) for sec, f in Config.model_fields.items() if sec != "models"
    ]  # models: a list of model blocks, one key
    assert keys == [
        k
        for sec, f in Config.model_fields.items()
        for k in ([sec] if sec == "models" else [f"{sec}.{name}" for name in f.annotation.model_fields])
    ]
    assert len(keys) == 1 + sum(len(f.annotation.model_fields) for _, f in sections)
    assert all(r["meaning"] for r in rows), [r["key"] for r in rows if not r["meaning"]]
    by_key = {r["key"]: r for r in rows}
    assert (
        by_key["run.min_errors"]["default"],
        by_key["run.retry_failed"]["default"],
        by_key["input.root"]["default"],
    ) == ("5", "false", "–")
    assert cli_main(["config"]) == 0
    printed = capsys.readouterr().out
    assert all(k in printed for k in keys)
    assert cli_main(["config", "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.count("\n| `") == len(keys)

    from tests.conftest import doc_section

    section = doc_section("configuration.md", "Every key")
    begin, end = "<!-- generated: imgscore config --format markdown -->\n", "<!-- end generated -->"
    table = section.split(begin, 1)[1].split(end, 1)[0]
    assert table == markdown, "docs/configuration.md: paste `imgscore config --format markdown` between its markers"
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    missing = []
    for key in keys:
        section, _, name = key.partition(".")
        if not any(
            f"`{key}`" in cell or (f"`{section}." in cell and re.search(rf"`{name}`|\b{name}\b", cell))
            for cell in first_cells
        ):
            missing.append(key)
    assert not missing, (
        f"docs/configuration.md config table lacks {missing} (imgscore config --format markdown lists them)"
    )


# ------------------------------------------------------------------ config files as input


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    p = tmp_path / "c.yaml"
    # the second output block would silently drop output.root (the run wrote into ./outputs)
    p.write_text("input:\n  root: /data\noutput:\n  root: /scores\nmodel:\n  arch: resnet18\noutput:\n  topk: 3\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml' line 7: key 'output' is given twice \(first at line 3\).*merge the two"
    ):
        load_config(p)
    p.write_text("model:\n  arch: resnet18\n  classes: [a, b]\n  arch: resnet50\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'model.arch' is given twice \(first at line 2\)"):
        load_config(p)


def test_merge_keys_and_one_alias_still_read(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "x-pre: &pre {resize: 64, crop: 56}\npreprocess:\n  <<: *pre\n  crop: 48\n"
    )  # a key beside a merge overrides the merged one
    from imgscore.config.strict_yaml import read_yaml

    assert read_yaml(p.read_text())["preprocess"] == {"resize": 64, "crop": 48}
    assert read_yaml("a: &n [x, y]\nb: *n\n") == {"a": ["x", "y"], "b": ["x", "y"]}


def test_a_billion_laughs_config_is_refused_quickly_and_small(tmp_path):
    import time
    import tracemalloc

    # 9 levels of 9 aliases: 9**9 (387 million) strings from a 400-byte file
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("storage:\n  options:\n" + "".join(f"    {line}\n" for line in levels))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"bomb.yaml': its aliases \(\*name\) expand to more than 100,000 values"):
            load_config(p)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2.0 and peak < 20 * 2**20, (seconds, peak)
    with pytest.raises(ConfigError, match="alias bomb"):  # --set values are YAML too
        parse_override("storage.options=" + "{" + ", ".join(levels).replace(": &", ": &") + "}")


def test_a_recursive_alias_and_absurd_nesting_are_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("storage:\n  options: &o {x: *o}\n")
    with pytest.raises(ConfigError, match=r"line 2: an alias refers to the value that holds it"):
        load_config(p)
    p.write_text("storage:\n  options: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(ConfigError, match="nests mappings or lists too deeply"):
        load_config(p)


def test_yaml_booleans_where_names_were_meant_are_explained(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  classes: [no, yes, maybe]\n")
    with pytest.raises(
        ConfigError,
        match=r"model.classes item 0 is the boolean false: YAML reads unquoted no/yes/on/off.*quote it: 'no'",
    ) as e:
        load_config(p)
    assert "lax-or-strict" not in str(e.value) and "pydantic" not in str(e.value)
    p.write_text("model:\n  classes: ['no', 'yes', maybe]\n")
    assert load_config(p).model.classes == ["no", "yes", "maybe"]
    with pytest.raises(ConfigError, match=r"^config run.run_id is the boolean true: YAML reads .* quote it: 'yes'"):
        build_config({}, ["run.run_id=on"])
    assert build_config({}, ["run.skip_scored=yes"]).run.skip_scored is True  # a boolean key still takes yes


def test_a_long_bad_value_is_not_echoed_whole():
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"classes": [f"class_{i:05d}" for i in range(10_000)] + [1.5j]}})
    assert len(str(e.value)) < 1500 and "characters)" in str(e.value)


def test_tilde_is_the_home_folder_in_path_keys_and_dollar_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SCORES", "/elsewhere")
    cfg = build_config(
        {"model": {"checkpoint": "~/m.pt", "classes": "~/classes.txt"}, "inference": {"cache_dir": "~/cache"}},
        ["input.root=~/images", "output.root=~/scores"],
    )
    assert cfg.input.root == tmp_path / "images" and cfg.output.root == tmp_path / "scores"
    assert (cfg.model.checkpoint, cfg.model.classes, cfg.inference.cache_dir) == (
        tmp_path / "m.pt",
        tmp_path / "classes.txt",
        tmp_path / "cache",
    )
    assert build_config({"models": [{"name": "a", "checkpoint": "~/a.pt"}]}).models[0].checkpoint == tmp_path / "a.pt"
    assert str(build_config({}, ["output.root=$SCORES/x"]).output.root) == "$SCORES/x"  # never the environment's
    assert build_config({}, ["output.root=s3://b/~x"]).output.root == "s3://b/~x"
    assert build_config({}, ["model.classes=[~a, b]"]).model.classes == ["~a", "b"]  # names, not paths


def test_a_path_that_yaml_read_as_a_boolean_is_explained_once():
    for key, word in (
        ("input.root", "no"),
        ("output.root", "off"),
        ("model.checkpoint", "yes"),
        ("model.classes", "no"),
    ):
        with pytest.raises(ConfigError) as e:
            build_config({}, [f"{key}={word}"])
        assert str(e.value).count("YAML reads unquoted") == 1 and str(e.value).startswith(
            f"config {key} is the boolean"
        ), str(e.value)


def test_flow_parameters_carry_a_small_config_inline_and_a_large_one_by_reference():
    import json
    from pathlib import Path

    from imgscore.config.flow_params import (
        MAX_PARAMETER_BYTES,
        flow_config,
        flow_parameters,
        raw_flow_config,
    )

    small = build_config({}, ["input.root=/data", "runner.n_workers=3"])
    with flow_parameters(small) as params:
        assert params == {"config": small.to_dict()}
    large = build_config(
        {"model": {"classes": [f"name {i:05d} " + "y" * 40 for i in range(5000)]}}, ["runner.n_workers=3"]
    )
    with flow_parameters(large) as params:
        path = Path(params["config_file"])
        assert list(params) == ["config_file"] and path.stat().st_size > MAX_PARAMETER_BYTES
        assert path.stat().st_mode & 0o077 == 0  # private: the config may name internal paths
        assert flow_config(None, str(path)) == large  # what the flow reads back
        assert raw_flow_config(params)["runner"]["n_workers"] == 3  # what the task runner and the hook read
        assert json.loads(path.read_text())["model"]["classes"][4999].startswith("name 04999 ")
    assert not path.exists()
    with pytest.raises(ConfigError, match="exactly one of them"):
        flow_config(None, None)
    with pytest.raises(ConfigError, match=r"config_file '/nonexistent.json' cannot be read"):
        raw_flow_config({"config_file": "/nonexistent.json"})


def test_numbers_and_sets_where_class_names_were_meant_are_refused(tmp_path):
    """YAML 1.1 reads 001, 010 and 12:30 as 1, 8 and 750: recorded as class names they mislabel every prediction."""
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  classes: [001, 010, 12:30]\n")
    with pytest.raises(
        ConfigError, match=r"model.classes item 0 is the number 1: YAML reads unquoted 001/010/12:30.*quote the names"
    ):
        load_config(p)
    with pytest.raises(ConfigError, match=r"model.classes item 0 is the number 7: .*quote the names"):
        build_config({}, ["model.classes=[007, 010, x]"])
    p.write_text("model:\n  classes: !!set {a, b, c}\n")
    with pytest.raises(
        ConfigError, match=r"model.classes must be a list \(a YAML sequence, in order\), got a set; a set has no order"
    ):
        load_config(p)
    p.write_text("model:\n  classes: ['001', '010', '12:30']\n")
    assert load_config(p).model.classes == ["001", "010", "12:30"]  # the fix the message names works
    with pytest.raises(ConfigError, match=r"^config model.arch is the number 83: .*quote"):
        build_config({}, ["model.arch=0123"])
    with pytest.raises(ConfigError, match=r"^config model.name is the number 750: "):
        build_config({}, ["model.name=12:30"])
    assert build_config({}, ["run.run_id=20260101"]).run.run_id == "20260101"  # a numeric run id is a folder name


def test_booleans_where_numbers_were_meant_are_refused():
    for key in (
        "input.decode_timeout_s",
        "inference.timeout_s",
        "run.shard_size",
        "inference.batch_size",
        "input.max_pixels",
    ):
        with pytest.raises(ConfigError, match=rf"^config {key} is the boolean true, not a number: YAML reads unquoted"):
            build_config({}, [f"{key}=true"])
    with pytest.raises(ConfigError, match=r"^config preprocess.background is the boolean false, not a number"):
        build_config({}, ["preprocess.background=[false, 0, 0]"])
    cfg = build_config({}, ["input.decode_timeout_s=30", "inference.timeout_s='45'"])
    assert (cfg.input.decode_timeout_s, cfg.inference.timeout_s) == (30.0, 45.0)  # ints and text numbers still do
    assert build_config({}, ["output.embeddings=true"]).output.embeddings is True


def test_non_finite_numbers_are_refused_at_config_time():
    """inf is written to JSON as null: a config that took it would fail in every shard instead."""
    for item in (
        "input.decode_timeout_s=inf",
        "input.decode_timeout_s=.inf",
        "inference.timeout_s=inf",
        "storage.read_timeout_s=nan",
    ):
        key = item.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^config {key} must be a finite number of seconds, got"):
            build_config({}, [item])
    with pytest.raises(ConfigError, match=r"config preprocess.mean.1 must be a finite number, got inf"):
        build_config({}, ["preprocess.mean=[0.5, .inf, 0.5]"])
    with pytest.raises(ConfigError, match=r"input.decode_timeout_s: Input should be greater than 0"):
        build_config({}, ["input.decode_timeout_s=0"])


def test_an_empty_root_is_refused_not_the_working_directory():
    """`--set output.root=$OUT` with OUT unset wrote predictions/, errors/ and runs/ into the cwd."""
    from imgscore.config.loading import build_config
    from imgscore.errors import ConfigError

    for key in ("output.root", "input.root"):
        with pytest.raises(
            ConfigError, match=rf"{key}.*is empty; set it to a folder or a URL \(an unset shell variable"
        ):
            build_config({}, [f"{key}="])
        with pytest.raises(ConfigError, match=rf"{key}.*is empty"):
            build_config({}, [f"{key}='  '"])


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from imgscore.config.loading import load_config
    from imgscore.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no configs/ here
    nightly = load_config("nightly")
    assert nightly.run.skip_scored is True  # the production template's setting, not the default
    assert load_config("demo").model.arch == "resnet18"
    with pytest.raises(
        ConfigError,
        match=r"config file 'configs/nightly.yaml' does not exist; give the path of a YAML file, "
        r"or the name of a config shipped with imgscore \(demo, nightly: --config nightly\)",
    ):
        load_config("configs/nightly.yaml")
