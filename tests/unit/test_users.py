"""--user, --group and unix socket options: parsing, resolving, checking, and the switch.

Parsing is pure. Resolving reads this machine's user database (root and nobody exist
everywhere this runs). The switch itself happens in a real forked child (root only), and
a unix socket with options is a real socket in tmp_path.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from handoff.cli.main import cli
from handoff.errors import ConfigError
from handoff.formats.identity import (
    IDENTITY_VARIABLE,
    WorkerIdentity,
    decode_identity,
    user_environment,
)
from handoff.formats.options import BindKind, BindSpec, parse_bind
from handoff.formats.worker_contract import FDSTORE_PREFIX, clean_environment
from handoff.system import children, users
from handoff.system.sockets import close_listeners, open_listeners

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
ALL_CAPS = {users.CAP_SETUID, users.CAP_SETGID, users.CAP_KILL}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


# -- unix:PATH,mode=,owner=,group= -------------------------------------------------------


def test_unix_options_are_parsed_and_the_path_is_what_precedes_them() -> None:
    spec = parse_bind("unix:/run/app.sock,mode=0660,owner=www,group=1000")
    assert (spec.kind, spec.path, spec.mode, spec.owner, spec.group) == (
        BindKind.UNIX,
        "/run/app.sock",
        0o660,
        "www",
        "1000",
    )
    assert spec.text == "unix:/run/app.sock,mode=0660,owner=www,group=1000"
    assert parse_bind("unix:/run/app.sock,mode=600").mode == 0o600
    assert parse_bind("unix:/run/app.sock,group=www-data").mode is None


def test_a_comma_not_followed_by_an_option_stays_in_the_path() -> None:
    assert parse_bind("unix:/run/a,b.sock").path == "/run/a,b.sock"
    assert parse_bind("unix:/run/a,b.sock,mode=0600").path == "/run/a,b.sock"
    plain = parse_bind("unix:/run/app.sock")
    assert (plain.mode, plain.owner, plain.group) == (None, "", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "unix:/run/a.sock,perm=0660",
            "'unix:/run/a.sock,perm=0660': unknown unix socket option 'perm=0660' "
            "(mode=OCTAL, owner=USER, group=GROUP)",
        ),
        (
            "unix:/run/a.sock,mode=0660,0600",
            "'unix:/run/a.sock,mode=0660,0600': unknown unix socket option '0600' "
            "(mode=OCTAL, owner=USER, group=GROUP)",
        ),
        (
            "unix:/run/a.sock,mode=0660,mode=0600",
            "'unix:/run/a.sock,mode=0660,mode=0600': mode= is given twice",
        ),
        ("unix:/run/a.sock,mode=rw", "'unix:/run/a.sock,mode=rw': mode= takes octal "
         "permissions such as 0660"),
        ("unix:/run/a.sock,mode=0689", "'unix:/run/a.sock,mode=0689': mode= takes octal "
         "permissions such as 0660"),
        ("unix:/run/a.sock,mode=4660", "'unix:/run/a.sock,mode=4660': mode= takes permission "
         "bits only, 0000 to 0777"),
        (
            "unix:/run/a.sock,group=",
            "'unix:/run/a.sock,group=': group= needs a name or a number "
            "(mode=OCTAL, owner=USER, group=GROUP)",
        ),
        ("unix:,mode=0660", "'unix:,mode=0660': unix: needs a path (forms: HOST:PORT, "
         "[V6]:PORT, :PORT, unix:PATH, fd:N, fd:NAME)"),
    ],
)  # fmt: skip
def test_bad_unix_options_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bind(text)
    assert caught.value.message == message


def test_socket_owners_are_resolved_by_name_or_number() -> None:
    spec = parse_bind(f"unix:/x.sock,owner=nobody,group={grp.getgrgid(0).gr_name}")
    assert users.socket_owner(spec) == (NOBODY.pw_uid, 0)
    assert users.socket_owner(parse_bind("unix:/x.sock,owner=4321,group=8765")) == (4321, 8765)
    assert users.socket_owner(parse_bind("unix:/x.sock,mode=0600")) == (-1, -1)
    with pytest.raises(ConfigError) as caught:
        users.socket_owner(parse_bind("unix:/x.sock,owner=no-such-user-h10"))
    assert caught.value.message == (
        "--bind unix:/x.sock,owner=no-such-user-h10: owner=: no such user 'no-such-user-h10'"
    )
    with pytest.raises(ConfigError, match="not a valid uid or gid"):
        users.socket_owner(parse_bind("unix:/x.sock,group=4294967295"))


def bound(tmp_path: Path, options: str) -> tuple[os.stat_result, list[object]]:
    listeners = open_listeners((parse_bind(f"unix:{tmp_path}/s.sock{options}"),), 8)
    return (tmp_path / "s.sock").lstat(), listeners  # type: ignore[return-value]


def test_a_unix_socket_gets_its_mode_before_anyone_can_connect(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        info, listeners = bound(tmp_path, ",mode=0640")
        assert os.umask(0o022) == 0o022, "the umask was left changed"
    finally:
        os.umask(umask)
    try:
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o640
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s.sock"))  # listening, after the chmod
    finally:
        close_listeners(listeners)  # type: ignore[arg-type]
    assert not (tmp_path / "s.sock").exists()


@needs_root
def test_a_unix_socket_gets_its_owner_and_group(tmp_path: Path) -> None:
    info, listeners = bound(tmp_path, ",owner=nobody,group=nogroup,mode=0660")
    close_listeners(listeners)  # type: ignore[arg-type]
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
        NOBODY.pw_uid,
        grp.getgrnam("nogroup").gr_gid,
        0o660,
    )
    # owner= alone keeps the mode the umask gives.
    umask = os.umask(0o027)
    try:
        info, listeners = bound(tmp_path, ",owner=nobody")
        close_listeners(listeners)  # type: ignore[arg-type]
    finally:
        os.umask(umask)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, 0o750)


def test_a_stored_unix_socket_gets_the_options_of_this_start(tmp_path: Path) -> None:
    """A socket back from systemd's fd store is adopted, and its file (found through
    sock_diag) gets the mode= given now."""
    path = tmp_path / "s.sock"
    stored = socket.socket(socket.AF_UNIX)
    stored.bind(str(path))
    stored.listen(8)
    path.chmod(0o666)
    spec = parse_bind(f"unix:{path},mode=0600")
    adopted = BindSpec(
        kind=BindKind.FD,
        text=spec.text,
        fd=stored.detach(),
        name=FDSTORE_PREFIX + "unix_" + str(path),
        path=str(path),
        mode=0o600,
    )
    listeners = open_listeners((adopted,), 8)
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        close_listeners(listeners)


# -- --user, --group -----------------------------------------------------------------------


def test_user_alone_is_its_uid_primary_group_and_supplementary_groups() -> None:
    identity = users.resolve_identity("nobody", None)
    assert identity == WorkerIdentity(
        uid=NOBODY.pw_uid,
        gid=NOBODY.pw_gid,
        groups=tuple(dict.fromkeys(os.getgrouplist("nobody", NOBODY.pw_gid))),
        user="nobody",
        home=NOBODY.pw_dir,
        shell=NOBODY.pw_shell,
    )
    assert users.resolve_identity(str(NOBODY.pw_uid), None) == identity
    root = users.resolve_identity("root", None)
    assert root is not None
    assert (root.uid, root.gid, root.user) == (0, 0, "root")
    assert 0 in root.groups


def test_user_and_group_take_that_group_with_the_users_groups() -> None:
    identity = users.resolve_identity("nobody", "root")
    assert identity is not None
    assert (identity.uid, identity.gid) == (NOBODY.pw_uid, 0)
    assert identity.groups == tuple(dict.fromkeys(os.getgrouplist("nobody", 0)))
    assert 0 in identity.groups


def test_group_alone_keeps_the_uid_and_has_that_one_group() -> None:
    assert users.resolve_identity(None, "4321") == WorkerIdentity(
        uid=os.geteuid(), gid=4321, groups=(4321,)
    )
    assert users.resolve_identity(None, None) is None


@pytest.mark.parametrize(
    ("user", "group", "message", "hint"),
    [
        (
            "no-such-user-h10",
            None,
            "--user no-such-user-h10: no such user 'no-such-user-h10'",
            "check the name (see: getent passwd), or create the user first",
        ),
        (
            "3999999999",
            None,
            "--user 3999999999: no such user '3999999999'",
            "check the name (see: getent passwd), or create the user first",
        ),
        (
            "nobody",
            "no-such-group-h10",
            "--group no-such-group-h10: no such group 'no-such-group-h10'",
            "check the name (see: getent group), or give a gid",
        ),
        (
            None,
            "99999999999",
            "--group 99999999999: 99999999999 is not a valid uid or gid (0 to 4294967294)",
            None,
        ),
    ],
)
def test_unknown_users_and_groups_are_config_errors(
    user: str | None, group: str | None, message: str, hint: str | None
) -> None:
    with pytest.raises(ConfigError) as caught:
        users.resolve_identity(user, group)
    assert (caught.value.message, caught.value.hint) == (message, hint)
    assert caught.value.exit_code == 2


def other_user() -> WorkerIdentity:
    uid = NOBODY.pw_uid if os.geteuid() != NOBODY.pw_uid else 1
    return WorkerIdentity(uid=uid, gid=uid, groups=(uid,), user="other")


def test_switching_to_another_uid_needs_setuid_setgid_and_kill() -> None:
    other = other_user()
    users.check_switch(other, ALL_CAPS)
    with pytest.raises(ConfigError) as caught:
        users.check_switch(other, set())
    assert caught.value.message == (
        f"handoff runs as uid {os.geteuid()} and cannot switch its workers to "
        f"uid {other.uid} (other)"
    )
    assert caught.value.hint is not None
    assert "CAP_SETUID, CAP_SETGID and CAP_KILL" in caught.value.hint
    with pytest.raises(ConfigError, match="cannot switch its workers to gid"):
        users.check_switch(other, {users.CAP_SETUID, users.CAP_KILL})
    with pytest.raises(ConfigError) as caught:
        users.check_switch(other, {users.CAP_SETUID, users.CAP_SETGID})
    assert caught.value.message == (
        f"handoff runs as uid {os.geteuid()} without CAP_KILL: it could not stop workers "
        f"running as uid {other.uid} (other)"
    )


def test_a_master_may_always_be_what_it_already_is() -> None:
    same = WorkerIdentity(uid=os.geteuid(), gid=os.getegid(), groups=tuple(os.getgroups()))
    users.check_switch(same, set())


def test_the_effective_capabilities_are_read_from_proc() -> None:
    caps = users.effective_capabilities()
    if os.geteuid() == 0:
        assert caps >= ALL_CAPS
    assert all(0 <= cap < 64 for cap in caps)


# -- the value carried across a re-exec ----------------------------------------------------


def test_the_identity_round_trips_and_garbage_is_refused() -> None:
    identity = WorkerIdentity(
        uid=65534, gid=65534, groups=(65534, 27), user="nobody", home="/h", shell=NOBODY.pw_shell
    )
    assert decode_identity(identity.encode()) == identity
    assert identity.describe() == "uid 65534 (nobody), gid 65534, groups 65534,27"
    for bad in ("", "[]", '{"uid": -1, "gid": 0, "groups": []}', '{"uid": 1, "gid": 1}',
                '{"uid": true, "gid": 1, "groups": []}', "x" * (2 << 20),
                '{"uid": 1, "gid": 1, "groups": [], "user": "a\\u0000b"}'):  # fmt: skip
        with pytest.raises(ConfigError):
            decode_identity(bad)


def test_the_environment_gets_home_user_logname_and_shell_but_never_the_carried_value() -> None:
    identity = users.resolve_identity("nobody", None)
    assert user_environment(identity) == {
        "HOME": NOBODY.pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "SHELL": NOBODY.pw_shell,
    }
    assert user_environment(None) == {}
    assert user_environment(users.resolve_identity(None, "0")) == {}
    assert IDENTITY_VARIABLE not in clean_environment({IDENTITY_VARIABLE: "{}", "A": "1"})


def test_a_fresh_start_resolves_and_carries_a_resumed_master_takes_the_carried_value() -> None:
    environ: dict[str, str] = {IDENTITY_VARIABLE: "stale, from somewhere else"}
    if os.geteuid() != 0:
        pytest.skip("resolving another user needs root (check_switch)")
    identity = users.identity_for_run("nobody", None, environ, fresh=True)
    assert identity is not None
    assert environ[IDENTITY_VARIABLE] == identity.encode()
    # Re-executed in place: the names are not looked up again (this one does not exist).
    assert users.identity_for_run("no-such-user-h10", None, environ, fresh=False) == identity
    # A carried value that does not parse is looked up again.
    environ[IDENTITY_VARIABLE] = "garbage"
    assert users.identity_for_run("nobody", None, environ, fresh=False) == identity
    # Without --user the variable goes: nothing to carry.
    assert users.identity_for_run(None, None, environ, fresh=True) is None
    assert IDENTITY_VARIABLE not in environ


# -- the command line ----------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["run", *args, "--", "true"], prog_name="handoff")


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        (
            ["--user", "no-such-user-h10"],
            [
                "handoff: error: --user no-such-user-h10: no such user 'no-such-user-h10'",
                "hint: check the name (see: getent passwd), or create the user first",
            ],
        ),
        (
            ["--group", "no-such-group-h10"],
            [
                "handoff: error: --group no-such-group-h10: no such group 'no-such-group-h10'",
                "hint: check the name (see: getent group), or give a gid",
            ],
        ),
        (
            ["-b", "unix:/x.sock,owner=no-such-user-h10"],
            [
                "handoff: error: --bind unix:/x.sock,owner=no-such-user-h10: owner=: "
                "no such user 'no-such-user-h10'",
                "hint: check the name (see: getent passwd), or create the user first",
            ],
        ),
        (
            ["-b", "unix:/x.sock,mode=0660,perm=1"],
            [
                "handoff: error: Invalid value for '-b' / '--bind': 'unix:/x.sock,mode=0660,"
                "perm=1': unknown unix socket option 'perm=1' (mode=OCTAL, owner=USER, "
                "group=GROUP)",
                "hint: see 'handoff run --help'",
            ],
        ),
    ],
)
def test_bad_users_groups_and_socket_options_exit_2_with_one_line(
    args: list[str], lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(IDENTITY_VARIABLE, raising=False)
    result = invoke(*args)
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert result.stderr.splitlines() == lines
    assert IDENTITY_VARIABLE not in os.environ


# -- the switch, in a real child -----------------------------------------------------------

REPORT = r"""
import ctypes, os
libc = ctypes.CDLL(None)
death = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(death), 0, 0, 0)  # PR_GET_PDEATHSIG
caps = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")}
print(os.getresuid(), os.getresgid(), sorted(os.getgroups()), death.value,
      caps["CapEff"], caps["CapAmb"], os.environ.get("USER"), sep=";")
"""


def spawn_reporting(identity: WorkerIdentity, tmp_path: Path) -> list[str]:
    out = tmp_path / "report"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)  # inherited: no access check
    try:
        child = children.spawn(
            children.SpawnRequest(
                executable="/usr/bin/python3",
                argv=["python3", "-c", REPORT],
                env={"USER": "from-the-master-only"},
                identity=identity,
                output=fd,
            )
        )
    finally:
        os.close(fd)
    status = children.wait(child, block=True)
    child.close()
    assert status is not None
    assert status.success, (status, out.read_text())
    return out.read_text().strip().split(";")


@needs_root
def test_the_child_switches_before_exec_and_rearms_the_parent_death_signal(
    tmp_path: Path,
) -> None:
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for the child")
    identity = users.resolve_identity("nobody", None)
    assert identity is not None
    uids, gids, groups, death, eff, amb, user = spawn_reporting(identity, tmp_path)
    assert uids == str((NOBODY.pw_uid,) * 3)
    assert gids == str((NOBODY.pw_gid,) * 3)
    assert groups == str(sorted(set(identity.groups)))
    assert death == "9", "PR_SET_PDEATHSIG was not set again after the uid change"
    assert int(eff, 16) == int(amb, 16) == 0
    assert user == "from-the-master-only", "children.spawn sets no variable itself"


# Run in a fresh interpreter that imports first, then becomes nobody without capabilities:
# a master whose child cannot make the switch.
_REFUSED = """
import os, sys
from handoff.errors import SpawnError
from handoff.formats.identity import WorkerIdentity
from handoff.system import children
nobody = int(sys.argv[1])
os.setgroups([])
os.setresgid(nobody, nobody, nobody)
os.setresuid(nobody, nobody, nobody)
target = WorkerIdentity(uid=0, gid=0, groups=(0,), user="root")
try:
    children.spawn(
        children.SpawnRequest(executable="/bin/true", argv=["true"], env={}, identity=target)
    )
except SpawnError as exc:
    print(exc.message)
else:
    print("spawned")
"""


@needs_root
def test_a_switch_the_kernel_refuses_is_a_spawn_error_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _REFUSED, str(NOBODY.pw_uid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"cannot switch to uid 0 (root), gid 0, groups 0: {os.strerror(errno.EPERM)}"
    )
