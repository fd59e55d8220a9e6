"""Settings is the one reader of the worker's configuration: no other module of ``worker/``,
``tasks/`` or ``celeryconfig.py`` reads the environment, and each variable is parsed, defaulted
and refused (a ``ValidationError`` naming it) in ``worker/core/settings.py``."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worker.cli import cli
from worker.core.errors import ValidationError
from worker.core.settings import SETTINGS_ENV_NAMES, Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]

#: The modules that may read the environment, and why.
READERS = {
    "worker/core/settings.py": "the settings themselves",
    # A credential reference env:NAME names a variable holding a registry password: a
    # credential the worker reads when a step needs it, not a setting.
    "worker/core/credential_refs.py": "the variable a credential reference names",
    # COLUMNS is the terminal's convention for its width, which rich reads as well; pushctl
    # only asks whether it is there, to leave it in charge.
    "worker/cli/common.py": "COLUMNS, the terminal's width",
    # The standard OTEL_* variables belong to OpenTelemetry, whose SDK reads them itself; the
    # tracing module asks only whether they turn tracing on, with the SDK's own meaning.
    "worker/core/tracing.py": "whether the OTEL_* variables turn tracing on",
}
_ENV_READS = frozenset({"environ", "environb", "getenv", "getenvb"})


def sources() -> list[Path]:
    modules = [*ROOT.joinpath("worker").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py")]
    return sorted([*modules, ROOT / "celeryconfig.py"])


def environment_reads(path: Path) -> list[int]:
    """The lines of ``path`` that read the environment through ``os``.

    ``os.environ[NAME] = value`` is a write (worker.metrics hands prometheus_client the directory
    it chose) and is not counted; any other use of ``os.environ``/``os.getenv``, or importing
    them by name, is.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {
                alias.asname for alias in node.names if alias.name == "os" and alias.asname
            }
    written = {
        id(target.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Subscript)
    }
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(alias.name in _ENV_READS for alias in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in _ENV_READS
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
            and id(node) not in written
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_settings_reads_the_environment() -> None:
    """Every read of os.environ/os.getenv outside the documented readers is a setting read
    behind Settings' back: its default and validation would live in a second place."""
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sources()
        if (lines := environment_reads(path))
    }
    strays = {path: lines for path, lines in found.items() if path not in READERS}
    assert not strays, f"read these through worker.core.settings.get_settings(): {strays}"
    assert "worker/core/settings.py" in found  # the walk does see a read when there is one


def test_the_walk_tells_a_read_from_a_write(tmp_path: Path) -> None:
    """The checker itself: reads in every spelling are found, the metrics write is not."""
    module = tmp_path / "module.py"
    module.write_text(
        "import os\nimport os as system\nfrom os import getenv\n"
        "os.environ['A'] = 'x'\n"
        "a = os.environ.get('A')\n"
        "b = system.getenv('B')\n"
        "c = 'C' in os.environ\n"
    )
    assert environment_reads(module) == [3, 5, 6, 7]


BASE: dict[str, str] = {}


def settings_of(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def test_defaults() -> None:
    """Unset and empty (compose's ``NAME: ${NAME:-}``) both mean the default."""
    for settings in (Settings.from_env({}), settings_of(**dict.fromkeys(SETTINGS_ENV_NAMES, ""))):
        assert settings.reconcile_every == 60.0
        assert settings.reconcile_grace == 60.0
        assert settings.health_every == 300.0
        assert settings.worker_max_memory == 512
        assert settings.push_timeout == 1800.0
        assert settings.docker_hosts == ()
        assert settings.worker_host is None
        assert settings.metrics_port is None
        assert settings.metrics_addr == "0.0.0.0"  # noqa: S104
        assert settings.metrics_dir is None
        assert settings.operator is None


@pytest.mark.parametrize(
    ("name", "raw", "field", "value"),
    [
        ("PUSHWORKER_RECONCILE_EVERY", "15", "reconcile_every", 15.0),
        ("PUSHWORKER_RECONCILE_EVERY", " 0.5 ", "reconcile_every", 0.5),
        ("PUSHWORKER_RECONCILE_GRACE", "2.5", "reconcile_grace", 2.5),
        ("PUSHWORKER_RECONCILE_GRACE", "0", "reconcile_grace", 0.0),
        ("PUSHWORKER_HEALTH_EVERY", "1", "health_every", 1.0),
        ("PUSHWORKER_PUSH_TIMEOUT", "600", "push_timeout", 600.0),
        ("PUSHWORKER_HTTP_TIMEOUT", "2.5", "http_timeout", 2.5),
        ("PUSHWORKER_MAX_ATTEMPTS", "1", "max_attempts", 1),
        ("PUSHWORKER_WORKER_MAX_MEMORY", "0", "worker_max_memory", 0),
        ("PUSHWORKER_WORKER_MAX_MEMORY", " 1024 ", "worker_max_memory", 1024),
        ("PUSHWORKER_RETRY_BASE", "0", "retry_base", 0.0),
        ("PUSHWORKER_DOCKER_HOSTS", "builder-1", "docker_hosts", ("builder-1",)),
        ("PUSHWORKER_DOCKER_HOSTS", " b-1, b.2,,b-1 ", "docker_hosts", ("b-1", "b.2")),
        ("PUSHWORKER_WORKER_HOST", " builder-1 ", "worker_host", "builder-1"),
        ("PUSHWORKER_METRICS_PORT", "9808", "metrics_port", 9808),
        ("PUSHWORKER_METRICS_PORT", " 1 ", "metrics_port", 1),
        ("PUSHWORKER_METRICS_PORT", "65535", "metrics_port", 65535),
        ("PUSHWORKER_METRICS_ADDR", "127.0.0.1", "metrics_addr", "127.0.0.1"),
        ("PROMETHEUS_MULTIPROC_DIR", "/tmp/m", "metrics_dir", "/tmp/m"),
        ("PUSHWORKER_OPERATOR", "alice", "operator", "alice"),
        ("PUSHWORKER_SOURCES_DIR", "/srv/sources", "sources_dir", "/srv/sources"),
        ("PUSHWORKER_SOURCES_DIR", "", "sources_dir", None),
        ("PUSHWORKER_SKOPEO", "/opt/skopeo/bin/skopeo", "skopeo", "/opt/skopeo/bin/skopeo"),
        ("PUSHWORKER_SKOPEO", "", "skopeo", "/usr/bin/skopeo"),
        ("PUSHWORKER_BROKER_URL", "redis://r:6379/3", "broker_url", "redis://r:6379/3"),
    ],
)
def test_values_are_parsed(name: str, raw: str, field: str, value: Any) -> None:
    assert getattr(settings_of(**{name: raw}), field) == value


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("PUSHWORKER_RECONCILE_GRACE", "soon", "a number of seconds >= 0"),
        ("PUSHWORKER_RECONCILE_GRACE", "-1", "a number of seconds >= 0"),
        ("PUSHWORKER_RECONCILE_GRACE", "nan", "a number of seconds >= 0"),
        ("PUSHWORKER_RECONCILE_GRACE", "inf", "a number of seconds >= 0"),
        ("PUSHWORKER_RECONCILE_EVERY", "0", "a number of seconds > 0"),
        ("PUSHWORKER_RECONCILE_EVERY", "1m", "a number of seconds > 0"),
        ("PUSHWORKER_HEALTH_EVERY", "-5", "a number of seconds > 0"),
        ("PUSHWORKER_HEALTH_EVERY", "infinity", "a number of seconds > 0"),
        ("PUSHWORKER_PUSH_TIMEOUT", "0", "a number of seconds > 0"),
        ("PUSHWORKER_PUSH_TIMEOUT", "30min", "a number of seconds > 0"),
        ("PUSHWORKER_HTTP_TIMEOUT", "-1", "a number of seconds > 0"),
        ("PUSHWORKER_RETRY_BASE", "-0.5", "a number of seconds >= 0"),
        ("PUSHWORKER_RETRY_MAX", "five", "a number of seconds >= 0"),
        ("PUSHWORKER_MAX_ATTEMPTS", "0", "a whole number >= 1"),
        ("PUSHWORKER_MAX_ATTEMPTS", "2.5", "a whole number >= 1"),
        ("PUSHWORKER_WORKER_MAX_MEMORY", "-1", "a whole number >= 0"),
        ("PUSHWORKER_WORKER_MAX_MEMORY", "512M", "a whole number >= 0"),
        ("PUSHWORKER_METRICS_PORT", "0", "a whole number from 1 to 65535"),
        ("PUSHWORKER_METRICS_PORT", "65536", "a whole number from 1 to 65535"),
        ("PUSHWORKER_METRICS_PORT", "http", "a whole number from 1 to 65535"),
        ("PUSHWORKER_DOCKER_HOSTS", "builder-1,Builder-2", "'Builder-2', which is not a Docker"),
        ("PUSHWORKER_DOCKER_HOSTS", "a b", "'a b', which is not a Docker host name"),
        ("PUSHWORKER_DOCKER_HOSTS", "x/y", "'x/y', which is not a Docker host name"),
        ("PUSHWORKER_DOCKER_HOSTS", "x" * 64, "which is not a Docker host name"),
        ("PUSHWORKER_SKOPEO", "skopeo", "must be an absolute path"),
        ("PUSHWORKER_SKOPEO", "/usr/bin/sko\0peo", "must be an absolute path"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, raw: str, expected: str) -> None:
    """A bad value stops the process where settings are read, with the variable, the rule and
    the value: not a bare ValueError, nor a default used in silence."""
    with pytest.raises(ValidationError) as refused:
        settings_of(**{name: raw})
    assert refused.value.message.startswith(name)
    assert expected in refused.value.message
    assert refused.value.exit_code == 2


def test_config_shows_every_setting_masked() -> None:
    """``pushctl config`` prints ``masked()``: the new settings are there, as they are written."""
    shown = settings_of(
        PUSHWORKER_DOCKER_HOSTS="builder-1,builder-2",
        PUSHWORKER_METRICS_PORT="9808",
        PUSHWORKER_BROKER_URL="redis://:pw@r:6379/0",
        PUSHWORKER_SECRET_KEY="k",
    ).masked()
    for field in ("reconcile_every", "reconcile_grace", "health_every", "worker_host",
                  "metrics_port", "metrics_addr", "metrics_dir", "operator"):  # fmt: skip
        assert field in shown
    assert shown["docker_hosts"] == "builder-1,builder-2"
    assert shown["metrics_port"] == "9808"
    assert shown["worker_host"] == ""
    assert shown["broker_url"] == "redis://:***@r:6379/0"
    assert shown["secret_key"] == "(set)"


def test_pushctl_config_prints_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pushctl config --json`` prints what this process's settings hold, the new ones too."""
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", "builder-1,builder-2")
    monkeypatch.setenv("PUSHWORKER_RECONCILE_GRACE", "5")
    monkeypatch.setenv("PUSHWORKER_OPERATOR", "alice")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["config", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown == get_settings().masked()
    assert (shown["docker_hosts"], shown["reconcile_grace"], shown["operator"]) == (
        "builder-1,builder-2", "5.0", "alice",
    )  # fmt: skip
