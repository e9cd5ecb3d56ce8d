"""The config trees: one loader for `lmforge train` (Config) and `lmforge prepare`
(PrepareConfig); overrides, typed per-source settings, one-line errors, --help listings."""

from __future__ import annotations

import re

import pytest

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import (
    CleanConfig,
    Config,
    PrepareConfig,
    build_config,
    build_prepare_config,
    describe_keys,
)

SOURCE = {"name": "a", "paths": ["a.txt"]}
# `  --section.key V  doc (default: ...)`, the doc on the next lines when the key is long
CONFIG_ENTRY = re.compile(r"^  --(\w+\.\w+) V\s+((?:.*\n {10,})*.*)$", re.MULTILINE)


def _help(capsys, monkeypatch, verb: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_prepare_and_train_help_list_config_keys_the_same_way(capsys, monkeypatch):
    listed = {}
    for verb in ("train", "prepare"):
        out = _help(capsys, monkeypatch, verb)
        assert "config keys (--section.key=value; YAML recipes use the same names)" in out
        entries = dict(CONFIG_ENTRY.findall(out))
        assert all(re.search(r"\(default: .*\)$", doc) for doc in entries.values()), entries
        listed[verb] = set(entries)
    assert {"train.lr", "model.n_layer", "data.path"} <= listed["train"]
    assert {"clean.min_words", "dedup.threshold", "fetch.timeout_s"} <= listed["prepare"]
    assert {"prepare.val_fraction", "prepare.tokenizer", "prepare.workers"} <= listed["prepare"]
    for root, verb in ((Config, "train"), (PrepareConfig, "prepare")):
        assert listed[verb] == {k for k, _, _ in describe_keys(root) if "." in k}
    assert ("sources", [], describe_keys(PrepareConfig)[0][2]) == describe_keys(PrepareConfig)[0]


def test_prepare_overrides_take_effect_and_sources_get_typed_clean_settings():
    sources = [{**SOURCE, "clean": {"max_words": 9, "max_top_ngram_fraction": {}}}, {"name": "b"}]
    cfg = build_prepare_config(
        {"sources": sources, "clean": {"pii": True}},
        overrides=["--clean.min_words=3", "--prepare.val_fraction=0.2"],
    )
    assert cfg.clean.min_words == 3 and cfg.prepare.val_fraction == 0.2
    a, b = (s.clean for s in cfg.sources)
    assert isinstance(a, CleanConfig) and isinstance(b, CleanConfig)
    assert (a.min_words, a.max_words, a.pii) == (3, 9, True)  # global <- the source's own keys
    assert a.max_top_ngram_fraction == {}  # a value replaces the global one (turns the rule off)
    assert b == cfg.clean


@pytest.mark.parametrize(
    ("layer", "overrides", "message"),
    [
        (
            {"sources": [{**SOURCE, "clean": {"min_wrds": 3}}]},
            [],
            "unknown config key 'sources[0].clean.min_wrds'; did you mean 'sources[0].clean.min_words'?",
        ),
        (
            {"sources": [SOURCE, {"name": "b", "clean": {"min_words": "many"}}]},
            [],
            "bad value for config key 'sources[1].clean.min_words': Value 'many' of type 'str' "
            "could not be converted to Integer",
        ),
        (
            {"sources": [{**SOURCE, "wieght": 1}]},
            [],
            "unknown config key 'sources[0].wieght'; did you mean 'sources[0].weight'?",
        ),
        ({"tokenizer": "byte"}, [], "unknown config key 'tokenizer'; did you mean 'prepare.tokenizer'?"),
        ({}, ["--clean.min_wrds=3"], "unknown config key 'clean.min_wrds'; did you mean 'clean.min_words'?"),
        ({}, ["--prepare.val_fraction=0.6"], "prepare.val_fraction=0.6 must be in [0, 0.5] (--val-fraction)"),
        ({}, ["--prepare.min_split_tokens=-1"], "prepare.min_split_tokens=-1 must be >= 0"),
        ({"sources": [{**SOURCE, "clean": 3}]}, [], "config key 'sources[0].clean' must be a mapping"),
        ({"sources": [{"name": "my file"}]}, [], "source name 'my file' is not a plain name"),
    ],
)  # fmt: skip
def test_prepare_config_errors_are_one_line(layer, overrides, message):
    with pytest.raises(LmforgeError) as e:
        build_prepare_config(layer, overrides=overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_train_config_errors_keep_their_form():
    with pytest.raises(
        LmforgeError, match=r"^unknown config key 'train.lrr'; did you mean 'train.lr'\?$"
    ):
        build_config(overrides=["--train.lrr=1"])
    with pytest.raises(LmforgeError, match="^bad value for config key 'train.lr': "):
        build_config(overrides=["--train.lr=fast"])


def test_recipe_paths_resolve_next_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.txt").write_text("x", encoding="utf-8")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("sources: [{name: a, paths: [a.txt, b.txt, '*.md']}]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    paths = build_prepare_config(recipe).sources[0].paths
    assert paths == [str(tmp_path / "recipes" / "a.txt"), "b.txt", "*.md"]
    (tmp_path / "a.txt").write_text("y", encoding="utf-8")  # found from the working directory
    assert build_prepare_config(recipe).sources[0].paths[0] == "a.txt"


def test_later_layers_replace_the_source_list():
    cfg = build_prepare_config(
        {"sources": [SOURCE, {"name": "b"}]},
        overrides=["--sources=[{name: c, paths: [c.txt], clean: {min_words: 1}}]"],
    )
    assert [s.name for s in cfg.sources] == ["c"] and cfg.sources[0].clean.min_words == 1
