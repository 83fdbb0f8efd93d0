"""README starts with the two set-up commands, and CI runs exactly the README's install and test command."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from uda_ray.cli import build_parser


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None and text.index(block.group(0)) < 20, "README must open with the commands block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_main_job_and_tests():
    main, tests = _readme_commands()
    assert main.endswith("uda-ray tune search_spaces/demo.yaml")
    assert (ROOT / "search_spaces" / "demo.yaml").is_file()
    assert tests.endswith('pip install -e ".[dev]" && pytest')


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    install_and_test = tests.split("activate && ", 1)[1]
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_cli_has_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "evaluate", "tune", "ablate", "analyze", "retrain"}
