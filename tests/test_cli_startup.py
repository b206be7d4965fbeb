"""Both command lines start fast (no torch/diffusers for --help), say their version, and offer choices as enums."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("package, name", [("wadi_distill", "wadi-distill"), ("wadi_probe", "wadi-probe")])
def test_help_and_version_do_not_import_torch(package, name):
    code = (f"import sys; sys.argv = ['{name}', '--help']\n"
            f"from {package}.cli import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'pandas') if m in sys.modules)\n"
            "print('HEAVY', heavy, 'EXIT', code)\n")
    result = _run(code)
    assert "HEAVY [] EXIT 0" in result.stdout, result.stdout + result.stderr
    assert "Usage" in result.stdout
    version = _run(f"import sys; sys.argv = ['{name}', '--version']\nfrom {package}.cli import main\nmain()")
    assert version.returncode == 0 and version.stdout.strip() == f"{name} 0.1.0"


def test_top_level_names_still_import_lazily():
    result = _run("import sys, wadi_distill, wadi_probe\n"
                  "print('torch' in sys.modules)\n"
                  "from wadi_distill import LoRaDConfig, load_lorad, plan_from_preset, inject_lorad\n"
                  "from wadi_probe import compare, load_report\n"
                  "print(LoRaDConfig.__module__, load_lorad.__module__, plan_from_preset.__module__, compare.__module__)\n"
                  "print(sorted(set(wadi_distill.__all__) - set(dir(wadi_distill))))")
    lines = result.stdout.split("\n")
    assert lines[0] == "False", result.stderr
    assert lines[1] == "wadi_distill.lorad.config wadi_distill.lorad.pipeline wadi_distill.plan.presets wadi_probe.analyze"
    assert lines[2] == "[]"
    missing = _run("import wadi_distill\nwadi_distill.no_such_name")
    assert "has no attribute 'no_such_name'" in missing.stderr


def test_choice_options_are_enums_that_match_the_library():
    from wadi_distill.cli.plan import Preset
    from wadi_distill.plan import PRESETS
    from wadi_probe.console import Device
    from wadi_probe.device import resolve_device

    assert tuple(p.value for p in Preset) == PRESETS
    assert resolve_device(Device.cpu).type == "cpu"
    assert {d.value for d in Device} == {"auto", "cpu", "cuda"}


def test_a_bad_choice_is_one_sentence_and_exit_2():
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    result = CliRunner().invoke(app, ["plan", "--teacher", "builtin:digits", "--preset", "nope", "--rank", "4"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown preset 'nope'; use paper, paper-conv or all-linear." in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["sample", "--teacher", "builtin:digits", "--prompt", "3", "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device 'tpu'; use auto, cpu or cuda." in " ".join(result.output.split())



@pytest.mark.parametrize("package", ["wadi_distill", "wadi_probe"])
def test_every_help_names_each_option_in_full_within_80_columns(package):
    """Piped at 80 columns (a log, a narrow terminal): each command's help names every option whole and no line is
    wider than 80."""
    import importlib

    from typer.main import get_command

    group = get_command(importlib.import_module(f"{package}.cli").app)
    assert group.commands
    code = (f"import sys\nfrom {package}.cli import app\n"
            f"for name in {sorted(group.commands)!r}:\n"
            "    sys.argv = ['prog', name, '--help']\n"
            "    print('=== ' + name, flush=True)\n"
            "    try:\n        app()\n    except SystemExit as e:\n        assert not e.code, (name, e.code)\n")
    result = _run(code)  # a subprocess with COLUMNS=80 and stdout piped, as a user's log would have it
    assert result.returncode == 0, result.stderr
    helps = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])
    for name, command in group.commands.items():
        text = helps[name]
        assert max(len(line) for line in text.splitlines()) <= 80, (name, text)
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:  # typer vendors its own click
                # the option's own row starts with its names, whole (not cut to "--rank-from-pro…")
                flags = "(?:, | / )".join(re.escape(f) for f in sorted(param.opts, key=len))
                row = re.compile(rf"^[\s│*]*{flags}(?: / [\w-]+)?(?=[\s,]|$)", re.M)
                assert row.search(text), (name, param.opts, text)
