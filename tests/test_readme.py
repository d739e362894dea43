"""The README stays true: its test command is what CI runs, and the quickstart prints what it shows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """The fenced code blocks of the README whose info string is `lang`."""
    blocks, current, info = [], None, ""
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_two_setup_commands_and_ci_runs_the_test_command():
    setup = [line.split("#")[0].strip() for line in _blocks("bash")[0].splitlines() if line.strip()]
    assert len(setup) == 2
    assert all(cmd.startswith("pip install torch==2.13.0 && ") for cmd in setup)
    assert setup[0].endswith("lstmwatch demo")
    assert setup[1] in (ROOT / ".ci" / "run").read_text()


def test_quickstart_prints_what_the_readme_shows():
    script = ROOT / "examples" / "quickstart.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    printed = (out.stdout + out.stderr).replace(str(script), "examples/quickstart.py").strip()
    shown = next(b for b in _blocks("") if "UnnormalizedInputWarning" in b).strip()
    assert printed == shown


def test_the_plain_install_draws_the_plots():
    # The main command's reports carry plots: matplotlib comes with `pip install .`, not as an extra.
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("matplotlib") for d in deps)


def test_the_readmes_way_to_turn_a_warning_into_an_error_works():
    import warnings

    import torch

    import lstmwatch

    assert "-W error::" not in README  # Python parses -W before site-packages: it cannot name lstmwatch's classes
    assert 'warnings.filterwarnings("error", category=lstmwatch.ExplodingGradientWarning)' in README
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=lstmwatch.UnnormalizedInputWarning)
        w = lstmwatch.watch(lstm)  # warnings go through the console sink, on by default
        out, _ = lstm(torch.randn(4, 6, 3) * 1000)
        out.pow(2).mean().backward()
        try:
            w.step(1.0)
            raised = False
        except lstmwatch.UnnormalizedInputWarning:
            raised = True
        w.close()
    assert raised
