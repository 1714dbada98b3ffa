"""The workers' directory and env files on disk (system/deploy_paths.py), and the chdir
a spawned child does itself (system/children.py ``SpawnRequest.cwd``).

Real files in tmp_path and a few short real processes (``/bin/sh`` for milliseconds),
like tests/unit/test_children.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from handoff.errors import ConfigError, SpawnError
from handoff.formats.env_file import MAX_ENV_FILE_BYTES, EnvFileError
from handoff.system import children
from handoff.system.deploy_paths import (
    absolute_paths,
    in_directory,
    read_env_files,
    start_directory,
    workers_directory,
)


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/srv/app-like: releases/1, and current -> releases/1; the test runs inside current."""
    (tmp_path / "releases" / "1").mkdir(parents=True)
    (tmp_path / "releases" / "2").mkdir()
    (tmp_path / "current").symlink_to("releases/1")
    monkeypatch.chdir(tmp_path / "current")
    return tmp_path


def test_pwd_naming_the_current_directory_is_kept_by_name(release: Path) -> None:
    environ = {"PWD": str(release / "current")}

    assert start_directory(environ, fresh=True) == str(release / "current")
    assert environ["PWD"] == str(release / "current")


@pytest.mark.parametrize(
    "pwd",
    [None, "", "relative/dir", "/elsewhere/not/here", "RELEASE/releases/2", "RELEASE/./current"],
)
def test_a_pwd_that_does_not_name_the_current_directory_is_corrected(
    release: Path, pwd: str | None
) -> None:
    environ = {} if pwd is None else {"PWD": pwd.replace("RELEASE", str(release))}
    actual = str(release / "releases" / "1")  # getcwd() resolves the symlink

    assert start_directory(environ, fresh=True) == actual
    assert environ["PWD"] == actual  # what a re-executed master will find


def test_a_reexecuted_master_trusts_pwd_even_after_a_flip(release: Path) -> None:
    environ = {"PWD": str(release / "current")}
    start_directory(environ, fresh=True)
    flipped = release / "next"
    flipped.symlink_to("releases/2")
    flipped.rename(release / "current")  # the master's own cwd stays releases/1

    assert start_directory(environ, fresh=True) == str(release / "releases" / "1")
    environ = {"PWD": str(release / "current")}
    assert start_directory(environ, fresh=False) == str(release / "current")


def test_chdir_is_joined_to_the_start_directory_and_checked_at_a_fresh_start(
    release: Path,
) -> None:
    start = str(release / "current")

    assert workers_directory(None, start, fresh=True) == start
    assert workers_directory(None, None, fresh=True) is None
    assert workers_directory(str(release), start, fresh=True) == str(release)
    # ".." is the kernel's, after the symlink: current/.. is releases/
    assert workers_directory("../2", start, fresh=True) == f"{start}/../2"
    assert workers_directory(".", start, fresh=True) == start
    assert workers_directory("./", start, fresh=True) == start
    with pytest.raises(ConfigError) as caught:
        workers_directory("/no/such/dir", start, fresh=True)
    assert caught.value.message == "--chdir /no/such/dir: no such directory"
    assert caught.value.exit_code == 2
    (release / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        workers_directory(str(release / "file"), start, fresh=True)
    # A re-executed master does not look: the workers report it when they start.
    assert workers_directory("/no/such/dir", start, fresh=False) == "/no/such/dir"


def test_relative_env_files_and_commands() -> None:
    assert absolute_paths(["a.env", "/etc/b.env"], "/srv/app/current") == (
        "/srv/app/current/a.env",
        "/etc/b.env",
    )
    assert absolute_paths(["a.env"], None) == ("a.env",)
    assert in_directory("./venv/bin/gunicorn", "/srv/app/current") == (
        "/srv/app/current/./venv/bin/gunicorn"
    )
    assert in_directory("gunicorn", "/srv/app/current") == "gunicorn"
    assert in_directory("/usr/bin/env", "/srv/app/current") == "/usr/bin/env"


def test_env_files_are_read_in_order_later_files_win(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text("A=1\nB=1\n")
    (tmp_path / "b.env").write_text("B=2\nC=2\n")

    assert read_env_files([str(tmp_path / "a.env"), str(tmp_path / "b.env")]) == {
        "A": "1",
        "B": "2",
        "C": "2",
    }
    assert read_env_files([]) == {}


def test_env_files_that_cannot_be_read_name_the_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # open() must not wait for a writer: the master would hang
    big = tmp_path / "big.env"
    big.write_bytes(b"A=" + b"x" * MAX_ENV_FILE_BYTES)
    cases = {
        str(tmp_path / "missing.env"): "No such file or directory",
        str(tmp_path): "not a regular file",
        str(fifo): "not a regular file",
        str(big): "larger than 1 MiB",
    }
    for path, reason in cases.items():
        with pytest.raises(EnvFileError) as caught:
            read_env_files([path])
        assert caught.value.message == f"env file {path}: {reason}"
        assert caught.value.line == 0


def spawn_in(cwd: str, out: Path) -> int | None:
    child = children.spawn(
        children.SpawnRequest(
            executable="/bin/sh",
            argv=["sh", "-c", f"pwd -P > {out}"],
            env={"PATH": os.defpath},
            cwd=cwd,
        )
    )
    try:
        status = children.wait(child, block=True)
    finally:
        child.close()
    assert status is not None
    return status.code


def test_the_child_enters_its_directory_resolving_the_symlink_at_spawn(release: Path) -> None:
    out = release / "pwd.out"
    assert spawn_in(str(release / "current"), out) == 0
    assert out.read_text().strip() == str(release / "releases" / "1")

    flipped = release / "next"
    flipped.symlink_to("releases/2")
    flipped.rename(release / "current")

    assert spawn_in(str(release / "current"), out) == 0
    assert out.read_text().strip() == str(release / "releases" / "2")


def test_a_directory_the_child_cannot_enter_is_a_spawn_error(release: Path) -> None:
    (release / "current").unlink()
    with pytest.raises(SpawnError) as caught:
        spawn_in(str(release / "current"), release / "never")

    assert caught.value.message == f"chdir {release}/current: No such file or directory"
    assert not (release / "never").exists()
