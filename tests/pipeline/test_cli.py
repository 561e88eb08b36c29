"""The ``ascl`` console script."""

import subprocess
import sys

from pipeline.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    assert "usage: ascl" in out and "version" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: ascl" in capsys.readouterr().out


def test_installed_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "version"],
                            capture_output=True, text=True, check=True)
    assert "tensorflow 2.21" in result.stdout and "keras 3." in result.stdout
