"""contrib/docker and contrib/kubernetes agree with the handoff they run.

The handoff command line each file contains is parsed with handoff's own options
(click: handoff.cli.main.run, `make_context`: parsed and converted, never run), and
the numbers the orchestrator sees are checked against it: ports, probe paths, the grace
period against --shutdown-delay + --drain-timeout, the stop signal against what handoff
does with it, the health check's command against handoff's commands.

What this cannot check without a container engine or a cluster (docs/kubernetes.md):
that the image builds, that the base image has the Python handoff needs, that the
kubelet accepts the manifests (only their shape is read here), and the timings.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from handoff.cli.main import cli, run
from handoff.core import events as ev
from handoff.master.loop import SIGNAL_REQUESTS
from handoff.system.signals import HANDLED

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
DOCKERFILE = CONTRIB / "docker" / "Dockerfile"
KUBERNETES = CONTRIB / "kubernetes"


def handoff_run(argv: list[str]) -> dict[str, Any]:
    """The parameters of `handoff run ARGS`, as handoff itself parses them."""
    assert argv[:2] == ["handoff", "run"], argv
    with run.make_context("handoff run", argv[2:]) as ctx:
        return dict(ctx.params)


def handoff_command(argv: list[str]) -> click.Context:
    """Parse `handoff SUBCOMMAND ARGS` with handoff's own group (a bad one raises)."""
    assert argv[0] == "handoff", argv
    name = argv[1]
    command = cli.commands.get(name) if isinstance(cli, click.Group) else None
    assert command is not None, f"handoff has no command {name!r}"
    return command.make_context(f"handoff {name}", argv[2:])


# -- Kubernetes ---------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            found.append(doc)
    return found


def deployment() -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == "Deployment"]
    return found


def container() -> dict[str, Any]:
    (found,) = deployment()["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def port_number(value: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(value, int):
        return value
    (number,) = [p["containerPort"] for p in container()["ports"] if p["name"] == value]
    assert isinstance(number, int)
    return number


def test_kubernetes_yaml_parses() -> None:
    kinds = sorted(m["kind"] for m in manifests())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    (pdb,) = [m for m in manifests() if m["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"] == deployment()["spec"]["selector"]


def test_deployment_ports_match_the_command_line() -> None:
    params = handoff_run(container()["command"])
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert [b.port for b in params["binds"]] == [ports["http"]]
    assert params["health"] is not None, "the probes need --health"
    assert params["health"].port == ports["health"]
    assert params["health"].host == "0.0.0.0", "the kubelet probes the pod's IP"
    (service,) = [m for m in manifests() if m["kind"] == "Service"]
    (service_port,) = service["spec"]["ports"]
    assert port_number(service_port["targetPort"]) == ports["http"]
    assert service["spec"]["selector"] == deployment()["spec"]["selector"]["matchLabels"]


def test_deployment_probes_use_the_health_endpoint() -> None:
    spec = container()
    health = handoff_run(spec["command"])["health"].port
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert spec["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_number(spec[probe]["httpGet"]["port"]) == health, probe
    # the startup probe waits at least as long as the first generation may take
    params = handoff_run(spec["command"])
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= params["ready_timeout"]


def test_grace_period_covers_shutdown_delay_and_drain() -> None:
    params = handoff_run(container()["command"])
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert params["shutdown_delay"] > 0, "without a delay the endpoints may lag the stop"
    assert grace > params["shutdown_delay"] + params["drain_timeout"]


def test_rolling_update_never_goes_below_replicas() -> None:
    strategy = deployment()["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1


def test_configmap_is_the_env_file_reload_reads() -> None:
    spec = container()
    pod = deployment()["spec"]["template"]["spec"]
    params = handoff_run(spec["command"])
    (configmap,) = [m for m in manifests() if m["kind"] == "ConfigMap"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap")]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in spec["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount, "a subPath mount is never updated by the kubelet"
    (key,) = configmap["data"]
    assert params["env_files"] == (f"{mount['mountPath']}/{key}",)
    # the environment the reload script's `kubectl exec` inherits names the socket
    env = {e["name"]: e["value"] for e in spec["env"]}
    assert "RUNTIME_DIRECTORY" in env


def test_reload_script() -> None:
    script = KUBERNETES / "reload.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    (configmap,) = [m for m in manifests() if m["kind"] == "ConfigMap"]
    (key,) = configmap["data"]
    assert configmap["metadata"]["name"] in text
    assert key in text
    labels = deployment()["spec"]["selector"]["matchLabels"]
    assert f"-l app={labels['app']}" in text
    (line,) = [
        t for t in text.splitlines() if t.lstrip().startswith("kubectl") and "handoff reload" in t
    ]
    handoff_command(shlex.split(line.split("--", 1)[1]))


# -- Docker -------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        found.append((word.upper(), rest.strip()))
    return found


def the(name: str) -> str:
    (found,) = [rest for word, rest in instructions() if word == name]
    return found


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), text
    assert all(isinstance(v, str) for v in value), text
    return value


def test_dockerfile_entrypoint_runs_handoff() -> None:
    entrypoint = exec_form(the("ENTRYPOINT"))
    params = handoff_run([*entrypoint, *exec_form(the("CMD"))])
    assert entrypoint[-1] == "--", "CMD is the server's command"
    ports = {int(p) for p in the("EXPOSE").split()}
    assert {b.port for b in params["binds"]} | {params["health"].port} == ports
    assert params["shutdown_delay"] > 0


def test_dockerfile_stopsignal_is_a_graceful_stop() -> None:
    # STOPSIGNAL is what the runtime sends handoff; --stop-signal is what handoff sends
    # its workers. The first must be one handoff answers with a graceful stop.
    sig = signal.Signals[the("STOPSIGNAL")]
    request = SIGNAL_REQUESTS[sig]
    assert isinstance(request, ev.StopRequested)
    assert not request.fast


def test_dockerfile_user_is_not_root() -> None:
    user = the("USER")
    assert user not in ("root", "0")
    assert not user.startswith(("root:", "0:"))
    # the control socket's directory belongs to that user
    (env,) = [rest for word, rest in instructions() if word == "ENV"]
    assert env.startswith("RUNTIME_DIRECTORY=")
    directory = env.split("=", 1)[1]
    assert any(f"-o {user} " in rest and directory in rest for _, rest in instructions())


def test_dockerfile_healthcheck_runs_handoff_probe() -> None:
    healthcheck = the("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = exec_form(command)
    assert argv[:2] == ["handoff", "probe"]
    assert "--ready" in argv
    if "probe" not in getattr(cli, "commands", {}):
        pytest.skip("`handoff probe` is not built yet")
    handoff_command(argv)
    assert "--start-period=" in options, "the first generation may take a while to start"


# -- PID 1 --------------------------------------------------------------------------------


def test_every_documented_signal_has_a_handler() -> None:
    # As PID 1 the kernel drops every signal the master has no handler for: a signal
    # docs/cli.md documents must have one, or it would do nothing in a container.
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text.split("## Signals to the master", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            for name in row.split("|")[1].replace("`", "").split("/"):
                documented.add(signal.Signals[f"SIG{name.strip()}"])
    assert len(documented) >= 8, documented
    assert documented <= set(HANDLED), documented - set(HANDLED)
