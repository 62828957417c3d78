"""CLI flags come from the config classes: same defaults, help from the field descriptions, presets overridable."""

from __future__ import annotations

import argparse

import pytest

from cpl.cli import build_parser, search_config
from cpl.cli_fields import shown_default
from cpl.config import SearchConfig
from cpl.formats import PromptFormat
from cpl.training.cli import build_config
from cpl.training.config import CONFIG_CLASSES, SFTConfig

SEARCH = ["search", "--question", "q", "--out", "o"]
TRAIN = ["--model", "m", "--data", "d", "--out", "o"]


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def field_actions(parser: argparse.ArgumentParser, model) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest in model.model_fields]


def test_every_search_config_field_is_described():
    assert [n for n, f in SearchConfig.model_fields.items() if not f.description] == []


@pytest.mark.parametrize(
    ("path", "model"),
    [(("search",), SearchConfig), (("round",), SearchConfig)]
    + [(("train", kind), cls) for kind, cls in CONFIG_CLASSES.items()],
)
def test_flag_help_and_defaults_are_the_config_fields(path, model):
    actions = field_actions(subparser(*path), model)
    assert actions, path
    for action in actions:
        info = model.model_fields[action.dest]
        assert info.description, action.dest
        if action.nargs == 0 and action.const is not None and not isinstance(action, argparse.BooleanOptionalAction):
            # A switch: --no-x sets a field whose default is True to False (or the reverse).
            assert action.const is not info.default, action.dest
            continue
        if action.help and "(default:" in action.help:
            assert f"(default: {shown_default(info.default)}" in action.help, (action.dest, action.help)
            assert action.help.startswith(info.description), action.dest
        if action.choices is not None and info.default is not None:
            assert shown_default(info.default) in [str(c) for c in action.choices], action.dest


def test_search_without_flags_is_the_config_default_or_the_round_preset():
    parser = build_parser()
    assert search_config(parser.parse_args(SEARCH)) == SearchConfig()
    for n in (1, 2):
        assert search_config(parser.parse_args([*SEARCH, "--round", str(n)])) == SearchConfig.round_preset(n)


def test_round_preset_is_overridden_by_every_given_flag():
    parser = build_parser()

    def config(*flags: str) -> SearchConfig:
        return search_config(parser.parse_args([*SEARCH, *flags]))

    assert config("--round", "2", "--simulations", "200").simulations == 200  # equal to the default: still given
    assert config("--round", "2").simulations == 100
    assert config("--round", "2", "--format", "plain").format is PromptFormat.PLAIN
    assert config("--round", "1", "--c-puct", "2.5", "--no-few-shot").model_dump() == (
        SearchConfig.round_preset(1, c_puct=2.5, few_shot=False).model_dump()
    )
    assert config("--simulations", "7", "--children", "2").simulations == 7


def test_round_command_takes_the_same_search_flags():
    parser = build_parser()
    base = ["round", "--base", "b", "--input", "i", "--run-dir", "r"]
    assert search_config(parser.parse_args(base)) == SearchConfig.round_preset(1)
    args = parser.parse_args([*base, "--round", "2", "--simulations", "200", "--max-step-tokens", "64"])
    assert search_config(args) == SearchConfig.round_preset(2, simulations=200, max_step_tokens=64)


def test_seed_is_the_search_seed_and_the_demo_is_seeded():
    from cpl.cli import DEMO_SEARCH_SEED

    parser = build_parser()
    assert search_config(parser.parse_args(SEARCH)).seed is None  # unseeded unless asked
    assert search_config(parser.parse_args([*SEARCH, "--seed", "12"])).seed == 12
    assert search_config(parser.parse_args([*SEARCH, "--round", "2", "--seed", "0"])).seed == 0
    assert "search seed" in subparser("search").format_help()
    assert parser.parse_args(["demo"]).seed == DEMO_SEARCH_SEED
    # `cpl round --seed` stays the round's own seed (fresh value head, engines), not a search setting.
    args = parser.parse_args(["round", "--base", "b", "--input", "i", "--run-dir", "r", "--seed", "3"])
    assert args.round_seed == 3 and search_config(args).seed is None


def test_bad_search_values_exit_2(capsys):
    from cpl.cli import main

    assert main([*SEARCH, "--temperature", "9"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main([*SEARCH, "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*SEARCH, "--simulations", "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("kind", sorted(CONFIG_CLASSES))
def test_train_without_flags_is_the_config_default(kind):
    args = build_parser().parse_args(["train", kind, *TRAIN])
    config = build_config(args)
    expected = CONFIG_CLASSES[kind]().model_copy(update={"loss": kind} if "loss" in type(config).model_fields else {})
    assert config == expected


def test_train_flags_reach_the_config():
    args = build_parser().parse_args(["train", "step-dpo", *TRAIN, "--lr", "3e-6", "--no-prefix-sharing"])
    config = build_config(args)
    assert (config.learning_rate, config.prefix_sharing, config.loss) == (3e-6, False, "step-dpo")
    args = build_parser().parse_args(["train", "sft", *TRAIN, "--round", "2", "--epochs", "5"])
    assert build_config(args).epochs == 5 != SFTConfig.round_preset(2).epochs
    args = build_parser().parse_args(["train", "value", *TRAIN, "--head-lr", "1e-3", "--quiet"])
    assert (build_config(args).head_learning_rate, build_config(args).progress) == (1e-3, False)
