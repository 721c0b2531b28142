"""`tandem serve --help` and `tandem route --help`: flags in named groups, each with a word of
help and its default, built by the real parser code."""
import argparse
import os
import subprocess
import sys

import pytest

from tandem.cli import build_parser

GROUPS = {
    "serve": ["model", "KV cache", "scheduling", "speculative decoding", "parallelism", "server"],
    "route": ["replicas", "routing", "server"],
}


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(GROUPS))
def test_help_lists_the_groups_in_a_real_process(command):
    env = dict(os.environ, COLUMNS="100")
    r = subprocess.run([sys.executable, "-m", "tandem.cli", command, "--help"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    titles = [line[:-1] for line in r.stdout.splitlines() if line.endswith(":")
              and not line.startswith(" ")]
    assert titles == ["options", *GROUPS[command]]
    assert "(default: None)" not in r.stdout  # a None default says what it means instead


@pytest.mark.parametrize("command", ["serve", "route", "generate"])
def test_every_option_has_help_and_shows_its_default(command):
    """Every option says what it is and what it is when not given. Exempt from the default:
    -h, required options (there is none), and flags whose default is False (off unless given);
    a flag that is on by default (--no-prefix-caching's dest) states it in words."""
    parser = subparser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0]
        assert action.help and action.help.strip(), f"{name}: no help"
        text = formatter._expand_help(action)
        if action.required or (action.nargs == 0 and action.default is False):
            continue
        assert "default:" in text, f"{name}: help shows no default: {text!r}"
        assert "(default: None)" not in text and "(default: [])" not in text, name


def test_group_titles_are_shared_between_helpers():
    """add_server_args files -dp under the engine's parallelism group, not a second one."""
    groups = {g.title: {a.dest for a in g._group_actions}
              for g in subparser("serve")._action_groups}
    assert {"tensor_parallel_size", "data_parallel_size"} <= groups["parallelism"]
    assert [g.title for g in subparser("serve")._action_groups].count("parallelism") == 1
