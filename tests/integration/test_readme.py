"""The newcomer's path, parsed out of README.md and run as written, so the README cannot drift
from the code: the quickstart block (emulated engine, proxy, curl, /metrics, /admin/estimator),
the test command that CI runs, and (slow) the install-and-demo command in a fresh virtual
environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.integration


def section_blocks(heading: str) -> list[str]:
    """The ```bash blocks of the README section whose heading starts with ``heading``."""
    start = README.index(f"## {heading}")
    end = README.find("\n## ", start + 3)
    return re.findall(r"```bash\n(.*?)```", README[start : end if end > 0 else None], re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    install, tests = section_blocks("The two commands")
    assert "pip install" in install and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests.strip() in [line.strip() for line in ci], (
        f"{tests.strip()!r} is not a line of .ci/run"
    )


@pytest.mark.timeout(180)
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    (block,) = section_blocks("Quickstart (no GPU)")
    engine, proxy = free_port(), free_port()  # the README's 8000/8080 may be taken here
    script = block.replace("8000", str(engine)).replace("8080", str(proxy))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "RIGHTSIZER_GPU__ENABLED": "false"}  # fmt: skip
    shim = tmp_path / "rightsizer"  # the console script, run from this checkout
    shim.write_text(f'#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m proxy "$@"\n')
    shim.chmod(0o755)
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    run = subprocess.run(
        ["bash", "-c", f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}"],
        capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data: [DONE]" in out, out[:2000]
    total = re.search(r'^rightsizer_requests_total\{.*outcome="ok".*\} (\d+)', out, re.M)
    assert total is not None and float(total.group(1)) >= 81, out[-3000:]
    assert '"deployments"' in out and '"model": "demo-model"' in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_and_demo_in_a_fresh_venv(tmp_path: Path) -> None:
    """The first command, in a new virtual environment: installs from this tree, the demo runs
    and loses nothing."""
    (install, _tests) = section_blocks("The two commands")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv}/bin:{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(venv), "RIGHTSIZER_GPU__ENABLED": "false"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    command = install.strip().replace("rightsizer demo", "rightsizer demo --duration 12")
    run = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=540)  # fmt: skip
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "lost 0" in run.stdout, run.stdout[-3000:]
