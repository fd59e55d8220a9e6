"""The benchmarks' choice of baseline CLI and the burst's counting helpers (no stack needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.burst import MANIFEST_PUT, _growth_lines, windows
from bench.common import chosen_cli, docker_clis, newest_docker_cli, version_key


def fake_docker(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "docker"
    path.write_text(f'#!/bin/sh\necho "Docker version {version}, build abc"\n')
    path.chmod(0o755)
    return path


def test_version_key_orders_numerically() -> None:
    assert version_key("28.2.2") > version_key("20.10.24+dfsg1")
    assert version_key("20.10.24+dfsg1") == (20, 10, 24)
    assert version_key("9.1") < version_key("10.0")
    assert version_key("garbage") == (0,)


def test_newest_cli_is_chosen_whatever_the_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_docker(tmp_path / "a", "20.10.24+dfsg1")
    new = fake_docker(tmp_path / "b", "28.2.2")
    monkeypatch.setenv("PATH", f"{old.parent}:{new.parent}")
    monkeypatch.setattr("bench.common.DOCKER_CLI_DIRS", ())
    assert {c.path for c in docker_clis()} == {str(old), str(new)}
    chosen = newest_docker_cli()
    assert (chosen.path, chosen.version) == (str(new), "28.2.2")


def test_a_symlinked_cli_is_counted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fake_docker(tmp_path / "usr-bin", "20.10.24")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").symlink_to(real)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{real.parent}")
    monkeypatch.setattr("bench.common.DOCKER_CLI_DIRS", ())
    assert len(docker_clis()) == 1


def test_docker_cli_option_wins(tmp_path: Path) -> None:
    given = fake_docker(tmp_path / "x", "19.3.0")
    assert chosen_cli(str(given)).version == "19.3.0"
    with pytest.raises(SystemExit):
        chosen_cli(str(tmp_path / "missing"))


def test_manifest_put_counts_only_accepted_manifest_puts() -> None:
    accepted = (
        '127.0.0.1 - - [30/Nov/2026:04:43:19 +0000] "PUT /v2/x/y/manifests/t1 HTTP/1.1" 201 0 "" '
        '"docker/20.10.24"'
    )
    refused = accepted.replace('" 201 ', '" 401 ')
    blob = accepted.replace("/manifests/t1", "/blobs/uploads/abc")
    logrus = 'level=info msg="response completed" http.request.method=PUT http.response.status=201'
    assert MANIFEST_PUT.search(accepted)
    assert not any(MANIFEST_PUT.search(line) for line in (refused, blob, logrus))


def test_windows_count_completions_per_second() -> None:
    moments = [0.5, 1.0, 5.0, 12.0, 15.0, 19.0, 25.0]
    assert windows(moments, 0.0, width=10.0) == [0.3, 0.3]
    assert windows([], 0.0) == []


def test_the_burst_reports_the_pool_processes_growth_per_thousand_jobs() -> None:
    """Mean pool RSS at each quarter of the drain, and its slope over the second half: a pool
    that grows 8 KiB a job shows +8,000 KiB per 1,000 jobs; one that stopped growing, +0."""

    done_at = [float(t) for t in range(1, 4001)]  # one job a second
    main = "1"

    def memory(rss_at: Callable[[float], float]) -> dict[str, object]:
        timeline = [
            [float(t), {main: 50 * 2**20, "2": rss_at(t), "3": rss_at(t)}]
            for t in range(0, 4001, 100)
        ]
        return {"main_pid": main, "worker_timeline": timeline, "succeeded_at": done_at}

    growing = _growth_lines(memory(lambda t: 100 * 2**20 + t * 8 * 1024))
    assert len(growing) == 1
    assert "+8000 KiB per 1,000 jobs" in growing[0]
    assert "100 MiB after 0" not in growing[0] and "131 MiB after 4000" in growing[0]
    flat = _growth_lines(memory(lambda t: 120 * 2**20))
    assert "+0 KiB per 1,000 jobs" in flat[0]
    assert _growth_lines({"main_pid": main, "worker_timeline": [], "succeeded_at": []}) == []
