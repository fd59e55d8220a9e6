"""scripts/compose-image's own logic, without root, network or an engine: which of the machine's
apt sources the base is made from, which pins are downloaded, and the build context it stages.
(The whole script runs in tests/e2e/test_compose_deploy.py.)"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """The script as a module (it has no .py name: it is a command)."""
    loader = importlib.machinery.SourceFileLoader(
        "compose_image", str(ROOT / "scripts/compose-image")
    )
    spec = importlib.util.spec_from_loader("compose_image", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compose_image"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_base_comes_from_the_machines_own_sources(script: ModuleType, tmp_path: Path) -> None:
    """One-line and deb822 files, the release and its -updates and -security suites; disabled
    entries, other releases, other files and non-http sources are left out; debootstrap's
    mirror is the release's own."""
    etc = tmp_path / "apt"
    write(etc / "sources.list", "# deb http://old.example/debian bookworm main\n")
    write(
        etc / "sources.list.d/debian.sources",
        "Types: deb\n"
        "# http://snapshot.example/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main contrib\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm-backports\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://off.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n",
    )
    write(
        etc / "sources.list.d/cloud.list",
        "deb [arch=amd64] https://vendor.example/apt cloud main\n",
    )
    write(etc / "sources.list.d/local.list", "deb [trusted=yes] file:/srv/repo bookworm main\n")
    write(etc / "sources.list.d/node.sources.disabled-by-farm", "Types: deb\nURIs: http://x\n")

    sources = script.apt_sources("bookworm", etc)

    assert [source.line() for source in sources] == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main contrib",
    ]
    machine = script.Machine("bookworm", "amd64", tuple(sources), {})
    assert machine.mirror == "http://mirror.example/debian"


def test_one_line_sources_count_too(script: ModuleType, tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    write(
        etc / "sources.list",
        "deb http://mirror.example/debian bookworm main non-free-firmware\n"
        "deb [signed-by=/k.gpg] http://mirror.example/security bookworm-security main # fixes\n",
    )
    lines = [source.line() for source in script.apt_sources("bookworm", etc)]
    assert lines == [
        "deb http://mirror.example/debian bookworm main non-free-firmware",
        "deb [signed-by=/k.gpg] http://mirror.example/security bookworm-security main",
    ]


def test_no_source_of_the_release_is_an_error_that_says_so(
    script: ModuleType, tmp_path: Path
) -> None:
    etc = tmp_path / "apt"
    write(etc / "sources.list", "deb http://mirror.example/debian trixie main\n")
    with pytest.raises(script.BuildError, match="no http\\(s\\) apt source for Debian bookworm"):
        script.apt_sources("bookworm", etc)


def test_every_pin_is_downloaded_whatever_its_marker(script: ModuleType) -> None:
    """Markers are for the image's pip: the downloading interpreter (a newer 3.11) would drop
    a pin the base's 3.11.2 needs."""
    lock = (
        "# a comment\n"
        "alembic==1.20.1\n"
        '  # redis needs it below 3.11.3\nasync-timeout==5.0.1 ; python_full_version < "3.11.3"\n'
        "\n"
    )
    assert script.every_pin(lock) == ["alembic==1.20.1", "async-timeout==5.0.1"]


def test_the_staged_context_is_what_dockerignore_admits_plus_the_wheels(
    script: ModuleType, tmp_path: Path
) -> None:
    """The copy holds the Dockerfile, .dockerignore, each path the .dockerignore admits (no
    caches) and the wheels in wheelhouse/; the repository itself gets no wheelhouse."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"wheel")
    work = tmp_path / "work"
    work.mkdir()

    context = script.staged_context(wheels, work)

    names = {path.name for path in context.iterdir()}
    assert names == {
        "Dockerfile", ".dockerignore", "requirements.lock", "pyproject.toml", "README.md",
        "celeryconfig.py", "worker", "tasks", "wheelhouse",
    }  # fmt: skip
    assert (context / "wheelhouse" / "demo-1.0-py3-none-any.whl").read_bytes() == b"wheel"
    assert (context / "worker" / "core" / "settings.py").is_file()
    assert not list(context.rglob("__pycache__"))
    assert not (ROOT / "wheelhouse").exists()
    # The build sees them: its .dockerignore admits them.
    assert "!wheelhouse*" in (context / ".dockerignore").read_text().splitlines()
