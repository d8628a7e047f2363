"""Every command's `--help` states each default once, and never a default of None."""

import importlib
import re

import pytest

COMMANDS = (
    "train",
    "predict",
    "evaluate",
    "export",
    "reproduce",
    "transfer",
    "train_prior",
    "inspect_data",
    "make_data",
)


def _flag_entries(text: str) -> list[str]:
    """The help of each option, its wrapped lines joined."""
    options = text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", options)
    return [" ".join(entry.split()) for entry in entries if entry.strip()]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_default_once(command, capsys):
    module = importlib.import_module(f"experiments.{command}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    entries = _flag_entries(text)
    assert len(entries) > 2
    for entry in entries:  # ("default" may also name a preset, as in --augment's)
        assert len(re.findall(r"\(default\b", entry)) <= 1, entry
