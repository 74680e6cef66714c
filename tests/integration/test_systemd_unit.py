"""deploy/recharged.service and recharged-api.service: what systemd itself says of them, and the directives operations
rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recharged.credentials import SECRET_NAMES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "recharged.service"
API_UNIT = DEPLOY / "recharged-api.service"  # `recharged api`: the same service, but for its command
UNITS = pytest.mark.parametrize("unit", [UNIT, API_UNIT], ids=["daemon", "api"])
SHIPPED_EXEC = "ExecStart=/usr/bin/recharged "

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (it comes with systemd)"
)


def directives(section: str, unit: Path = UNIT) -> dict[str, list[str]]:
    """The unit's `section` as key -> every value given, in order (systemd allows repeated keys)."""
    found: dict[str, list[str]] = {}
    current = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def installable_copy(tmp_path: Path, unit: Path) -> Path:
    """The shipped unit with ExecStart pointing at this environment's `recharged` (verify checks it exists)."""
    script = Path(sys.executable).with_name("recharged")
    assert script.is_file(), f"the recharged console script is missing at {script}"
    text = unit.read_text()
    assert text.count(SHIPPED_EXEC) == 1
    copy = tmp_path / unit.name
    copy.write_text(text.replace(SHIPPED_EXEC, f"ExecStart={script} "))
    return copy


@needs_systemd_analyze
@UNITS
def test_systemd_analyze_verify_is_clean(tmp_path: Path, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installable_copy(tmp_path, unit))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
@UNITS
def test_security_exposure_is_two_or_better(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


@UNITS
def test_service_directives_operations_rely_on(unit: Path) -> None:
    service = directives("Service", unit)
    command = "api" if unit == API_UNIT else "run"
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"/usr/bin/recharged --config /etc/recharged/config.toml {command}"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["WatchdogSec"] == ["60"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["78"]
    assert float(service["TimeoutStopSec"][0]) > 60  # above daemon.shutdown_timeout_seconds' default
    assert service["WorkingDirectory"] == ["/var/lib/recharged"]
    assert "RECHARGED_LOGGING__FORMAT=json" in service["Environment"]
    credentials = dict(value.split(":", 1) for value in service["LoadCredential"])
    assert credentials == {name: f"/etc/recharged/credentials/{name}" for name in SECRET_NAMES}


@UNITS
def test_enabled_for_multi_user_boot(unit: Path) -> None:
    assert directives("Install", unit)["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(DEPLOY / "recharged.sysusers.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'recharged'" in result.stdout + result.stderr
    assert directives("Service")["User"] == ["recharged"]
