"""CLI polish around the Hub commands: help with examples on every command, `python -m`, shell completion, --json."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["families", "inspect", "convert", "verify", "push", "demo"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_adapters", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_and_json(command):
    p = run(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "Usage: moe-adapters " + command in p.stdout  # the program's name, also under python -m
    assert "Examples:" in p.stdout and f"moe-adapters {command}" in p.stdout.split("Examples:")[1]
    assert "--json" in p.stdout  # every reporting command can print JSON


def test_top_level_help_names_push_and_hub_ids():
    out = run("--help").stdout
    assert "push" in out and "Qwen/Qwen3-30B-A3B" in out and "--install-completion" in out


def test_shell_completion():
    def complete(words: str, cword: int) -> list[str]:
        p = run(env={"_MOE_ADAPTERS_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert complete("moe-adapters pu", 1) == ["push"]
    assert complete("moe-adapters inspect x --family qwen3_m", 4) == ["qwen3_moe"]
    assert sorted(complete("moe-adapters inspect x --family qw", 4)) == ["qwen2_moe", "qwen3_moe", "qwen3_next"]
    assert complete("moe-adapters convert a b --to f", 5) == ["fused"]
    assert "--verify-against" in complete("moe-adapters push x --ver", 3)
