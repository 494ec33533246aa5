"""deploy/kubernetes/*.yaml name only what the code has (no cluster needed).

Every ``cellmux`` command line in a manifest is checked against the
command's ``--help`` and then parsed by the command's own parser; every
CELLMUX_* variable must be read by the code (or, for HAProxy, by
docs/haproxy.cfg); each TOML file of the config map is loaded as its
container sees it (its own mounts only) by the code that loads it; paths
must be mounted where they are used; the HAProxy config is
docs/haproxy.cfg; every field is one the Kubernetes API has. So a renamed
option or setting fails here.

The hosts' capabilities are checked for real (root only): a ``cellmux
host`` runs with exactly the DaemonSet's capability set (``setpriv``), for a
front that runs as the fronts' Deployment does (its uid, no capability, no
new privileges), and a kernel made through it is isolated and cleaned up.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from cellmux.client import Client
from conftest import URL_LINE, wait_for
from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
HAPROXY_CFG = os.path.join(ROOT, "docs", "haproxy.cfg")
#: Variables the manifests may set that libraries read, not cellmux.
LIBRARY_VARIABLES = {"PGPASSWORD"}  # libpq (psycopg)
#: Kernel uids for the hosts this test starts (none else uses them).
PRIVATE_UIDS = (340000, 340099)
#: A node name as Kubernetes gives one, for $(NODE_NAME).
NODE_NAME = "node-1.example"


def documents(name: str | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects of one file, or of every file (the
    kustomization, which is not one, only when asked for by name)."""
    paths = [os.path.join(DEPLOY, name)] if name else sorted(glob.glob(f"{DEPLOY}/*.yaml"))
    found = []
    for path in paths:
        with open(path) as f:
            found += [d for d in yaml.safe_load_all(f) if d is not None]
    return [d for d in found if name or d.get("kind") != "Kustomization"]


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every workload."""
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            yield spec, container


def cellmux_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = [(s, c) for s, c in containers() if c.get("command") == ["cellmux"]]
    assert {c["args"][0] for _, c in found} == {"serve", "host"}
    return found


def config_map(name: str) -> dict[str, str]:
    (found,) = [
        d for d in documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
    ]
    return found["data"]


def expand(value: str, container: dict[str, Any]) -> str:
    """Kubernetes' $(VAR) expansion of C{value} from the container's env."""
    names = {e["name"] for e in container.get("env", [])}
    fixed = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    fixed.setdefault("NODE_NAME", NODE_NAME) if "NODE_NAME" in names else None

    def one(match: re.Match[str]) -> str:
        assert match[1] in fixed, f"$({match[1]}) is not set in {container['name']}"
        return fixed[match[1]]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def help_flags(command: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "cellmux", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def source_text() -> str:
    texts = []
    for directory in ("src", "plugins"):
        for path in glob.glob(f"{ROOT}/{directory}/**/*.py", recursive=True):
            with open(path) as f:
                texts.append(f.read())
    return "\n".join(texts)


# -- the files ------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secrets_example() -> None:
    (kustomization,) = documents("kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {os.path.basename(p) for p in glob.glob(f"{DEPLOY}/*.yaml")}
    assert listed == present - {"kustomization.yaml", "secrets.example.yaml"}
    for doc in documents():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_every_secret_and_config_map_a_pod_uses_is_defined() -> None:
    defined = {(d["kind"], d["metadata"]["name"]): d for d in documents()}
    for spec, container in containers():
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in defined, volume
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined, volume
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = defined[("Secret", ref["name"])]
                assert ref["key"] in secret["stringData"], ref
        for mount in container.get("volumeMounts", []):
            if "subPath" in mount:
                (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
                source = defined[("ConfigMap", volume["configMap"]["name"])]
                assert mount["subPath"] in source["data"], mount


def test_the_haproxy_config_map_is_docs_haproxy_cfg() -> None:
    with open(HAPROXY_CFG) as f:
        assert config_map("cellmux-haproxy")["haproxy.cfg"] == f.read()


#: The Kubernetes API model of each kind the manifests hold.
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Where C{value} does not fit the Kubernetes API type C{type_name}
    (the official client's models: every field's name and type)."""
    import kubernetes.client

    if type_name.startswith("List["):
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        inner = type_name[len("List[") : -1]
        return [e for i, v in enumerate(value) for e in unknown_fields(v, inner, f"{path}[{i}]")]
    if type_name.startswith("Dict["):
        if not isinstance(value, dict):
            return [f"{path}: not a mapping"]
        inner = type_name[len("Dict[") : -1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in unknown_fields(v, inner, f"{path}.{k}")]
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{path}: {value!r} is not {type_name}"]
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: not a {type_name}"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: {type_name} has no such field")
        else:
            errors += unknown_fields(item, model.openapi_types[fields[key]], f"{path}.{key}")
    return errors


def test_every_field_is_one_the_kubernetes_api_has() -> None:
    for doc in documents():
        model = MODELS[(doc["apiVersion"], doc["kind"])]
        assert unknown_fields(doc, model, f"{doc['kind']}/{doc['metadata']['name']}") == []


def test_a_misspelt_field_is_found() -> None:
    (daemonset,) = [w for w in workloads() if w["kind"] == "DaemonSet"]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["appArmourProfile"] = {"type": "Unconfined"}
    container["ports"] = [{"containerPort": "8800"}]
    assert unknown_fields(daemonset, "V1DaemonSet", "ds") == [
        "ds.spec.template.spec.containers[0].securityContext.appArmourProfile: "
        "V1SecurityContext has no such field",
        "ds.spec.template.spec.containers[0].ports[0].containerPort: '8800' is not int",
    ]


# -- names the code must have -----------------------------------------------------


def test_every_cellmux_option_a_manifest_names_exists() -> None:
    for _, container in cellmux_containers():
        command, *args = container["args"]
        known = help_flags(command)
        named = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        assert named, container["name"]
        assert named <= known, (command, sorted(named - known))


def test_every_cellmux_variable_a_manifest_sets_is_read_by_the_code() -> None:
    code = source_text()
    with open(HAPROXY_CFG) as f:
        haproxy_cfg = f.read()
    seen = set()
    for _, container in containers():
        names = {e["name"] for e in container.get("env", [])}
        if container.get("command") == ["cellmux"]:
            for name in names:
                if name.startswith("CELLMUX_"):
                    assert re.search(rf"[\"']{name}[\"']", code), f"nothing reads {name}"
                    seen.add(name)
                elif name not in LIBRARY_VARIABLES:
                    # Only what $(VAR) expansion in args uses.
                    assert any(f"$({name})" in a for a in container["args"]), name
        elif container["name"] == "haproxy":
            used = set(re.findall(r"\$\{(CELLMUX_[A-Z0-9_]+)\}", haproxy_cfg))
            assert {n for n in names if n.startswith("CELLMUX_")} == used
            seen |= used
    assert "CELLMUX_TOKEN" in seen


def _as_mounted(tmp_path, spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Lay out, under tmp_path, the files and directories C{container}'s
    mounts give it; return {path in the container: path here}."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config = config_map("cellmux-config")
    secrets_example = {
        d["metadata"]["name"]: d for d in documents("secrets.example.yaml") if d["kind"] == "Secret"
    }
    keys = tmp_path / "keys"
    if not keys.exists():
        subprocess.run(
            [sys.executable, "-m", "cellmux", "keys", "new", "front", "--dir", str(keys)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [sys.executable, "-m", "cellmux", "keys", "new", "host", "--dir", str(keys)],
            check=True,
            capture_output=True,
        )
    where: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        here = tmp_path / container["name"][0] / mount["mountPath"].lstrip("/")
        volume = volumes[mount["name"]]
        if "subPath" in mount:
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text(config[mount["subPath"]])
        else:
            here.mkdir(parents=True, exist_ok=True)
            names: list[str] = []
            if "secret" in volume:
                names = list(secrets_example[volume["secret"]["secretName"]]["stringData"])
            elif "configMap" in volume:
                names = list(config_map(volume["configMap"]["name"]))
            for name in names:
                if (keys / name).exists():
                    shutil.copy(keys / name, here / name)
        where[mount["mountPath"]] = str(here)
    return where


def _translate(value: str, where: dict[str, str]) -> str:
    """A container path as laid out here (unchanged if no mount holds it)."""
    for mounted in sorted(where, key=len, reverse=True):
        if value == mounted or value.startswith(mounted.rstrip("/") + "/"):
            return where[mounted] + value[len(mounted) :]
    return value


@pytest.fixture
def short_path() -> Iterator[pathlib.Path]:
    """A directory with a short path: runtime directories under it must
    leave room for kernel link sockets (107 bytes a path)."""
    directory = tempfile.mkdtemp(prefix="dm")
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def test_every_command_line_and_setting_parses_as_its_container_sees_it(short_path) -> None:
    """Each cellmux container's args and TOML file, with paths mapped onto
    its mounts only, are accepted by the code that reads them."""
    tmp_path = short_path
    import tomllib

    from cellmux import tap
    from cellmux.config import ServerConfig, load_config_file

    for spec, container in cellmux_containers():
        where = _as_mounted(tmp_path, spec, container)
        command, *args = [expand(a, container) for a in container["args"]]
        config_path = args[args.index("--config") + 1]
        assert config_path in where, f"{container['name']}: {config_path} is not mounted"
        # Paths in the TOML must be mounted too (runtime and state dirs are
        # made by the program, so only their parent must exist).
        with open(where[config_path]) as f:
            settings = tomllib.loads(f.read())["cellmux"]
        if "kernel_uid_range" in settings:
            # A nursery that starts ends what runs under the uids of its
            # range that no live nursery holds: keep clear of the machine's.
            settings["kernel_uid_range"] = list(PRIVATE_UIDS)
        for key, value in settings.items():
            if isinstance(value, str) and value.startswith("/"):
                if key in ("runtime_dir", "state_dir"):
                    assert _translate(value, where) != value, f"{key} {value} is not on a volume"
                settings[key] = _translate(value, where)
        local = tmp_path / f"{container['name']}.toml"
        local.write_text(
            "[cellmux]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
        )
        load_config_file(local)  # no unknown key
        mapped = [_translate(a, where) for a in args]
        mapped[mapped.index("--config") + 1] = str(local)
        for path_option in ("--front-key", "--key", "--hosts-secret-key"):
            if path_option in args:
                original = args[args.index(path_option) + 1]
                assert _translate(original, where) != original, f"{original} is not mounted"
        if command == "serve":
            options = tap.Options()
            options.parseOptions(mapped)  # raises on an unknown option or a bad value
            assert isinstance(options["server_config"], ServerConfig)
        else:
            _check_host_command_line(mapped)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _check_host_command_line(argv: list[str]) -> None:
    """``cellmux host ARGV`` gets past its checks: it says it is running
    (and then dials fronts that are not there) instead of exiting with a
    settings error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cellmux", "host", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if " is running" in line:
                break
    finally:
        process.terminate()
        try:
            lines += process.communicate(timeout=30)[0].splitlines(keepends=True)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert any(line.startswith(f"cellmux host {NODE_NAME} is running") for line in lines), "".join(
        lines
    )


# -- the hosts' privileges, for real -------------------------------------------------

#: Linux capability numbers (linux/capability.h) of the names a manifest may add.
CAPABILITIES = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "NET_ADMIN": 12,
    "SYS_ADMIN": 21,
}


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()
            except (OSError, StopIteration):
                continue
            if int(uids[1]) == uid:
                found.append(int(entry))
    return found


#: Runs a command as the fronts' Deployment says (its uid and gid, no
#: capability, no_new_privs), where that uid can reach this interpreter
#: (maybe under a mode 0700 /root: a private mount namespace shows the way
#: to it, as the nursery does for kernels).
AS_THE_FRONT = """
import os, sys
from cellmux.kernel import sandbox
paths = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)),
         *[p for p in sys.path if os.path.isabs(p)]]
sandbox.expose_to_kernels(paths)
uid, gid, *argv = sys.argv[1:]
os.execvp("setpriv", ["setpriv", "--reuid", uid, "--regid", gid, "--clear-groups",
                      "--bounding-set", "-all", "--inh-caps", "-all", "--no-new-privs",
                      sys.executable, "-m", "cellmux", *argv])
"""


def _start(
    argv: list[str], log_path: pathlib.Path, tmp: pathlib.Path | None = None
) -> subprocess.Popen:
    env = None if tmp is None else {**os.environ, "TMPDIR": str(tmp)}
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_fronts_and_hosts_work_with_exactly_the_manifests_privileges(short_path) -> None:
    """A front run as the fronts' Deployment says (non-root, no capability)
    and a ``cellmux host`` with only the DaemonSet's capabilities (setpriv
    drops the rest from its bounding set): the host's kernels are isolated
    as docs/security.md says, and what they leave is ended and removed."""
    (front_spec,) = [
        w["spec"]["template"]["spec"] for w in workloads() if w["metadata"]["name"].endswith("f1")
    ]
    front_user = front_spec["securityContext"]
    front_context = front_spec["containers"][0]["securityContext"]
    assert front_user["runAsNonRoot"] and front_context["capabilities"]["drop"] == ["ALL"]
    assert front_context["allowPrivilegeEscalation"] is False  # hence --no-new-privs
    (daemonset,) = [w for w in workloads() if w["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"] and context["runAsUser"] == 0
    assert not context.get("privileged")
    added = context["capabilities"]["add"]
    bounding = "-all," + ",".join(f"+{name.lower()}" for name in added)

    # As the pods see their volumes: Secrets root-owned, group fsGroup, the
    # Secret's defaultMode; emptyDirs writable by all.
    base = short_path
    os.chmod(base, 0o711)
    keys = base / "keys"
    for name in ("front", "host"):
        subprocess.run(
            [sys.executable, "-m", "cellmux", "keys", "new", name, "--dir", str(keys)],
            check=True,
            capture_output=True,
        )
    os.chmod(keys, 0o755)
    front_secret = front_spec["volumes"]
    (mode,) = [v["secret"]["defaultMode"] for v in front_secret if "secret" in v]
    os.chown(keys / "front.key_secret", 0, front_user["fsGroup"])
    os.chmod(keys / "front.key_secret", mode)
    authorized = base / "authorized"
    authorized.mkdir(mode=0o755)
    shutil.copy(keys / "host.key", authorized)
    # ftmp: the front's TMPDIR. Its uid cannot write the test's HOME, so
    # IPython (imported for the kernel specs) makes itself a directory in
    # the temporary directory, and never removes it.
    for name in ("frt", "fst", "hrt", "ftmp"):
        (base / name).mkdir()
        os.chmod(base / name, 0o777)
    token = secrets.token_hex(16)
    # The front's own port is any free one (it says which): a port picked
    # here could be taken by another process before the front binds it.
    hosts_port = free_port()
    endpoint = f"tcp://127.0.0.1:{hosts_port}"
    front = _start(
        [sys.executable, "-c", AS_THE_FRONT, str(front_user["runAsUser"]),
         str(front_user["runAsGroup"]), "serve", "--host", "127.0.0.1", "--port", "0",
         "--token", token, "--no-local-kernels", "--pool-size", "0",
         "--hosts-listen", endpoint, "--hosts-secret-key", str(keys / "front.key_secret"),
         "--hosts-authorized-dir", str(authorized),
         "--runtime-dir", str(base / "frt"), "--state-dir", str(base / "fst")],
        base / "front.log",
        tmp=base / "ftmp",
    )  # fmt: skip
    config = base / "host.toml"
    config.write_text(f"kernel_uid_range = [{PRIVATE_UIDS[0]}, {PRIVATE_UIDS[1]}]\n")
    runtime = base / "hrt"
    host = _start(
        ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all",
         sys.executable, "-m", "cellmux", "host", "--front", endpoint,
         "--front-key", str(keys / "front.key"), "--key", str(keys / "host.key_secret"),
         "--name", "capped", "--config", str(config), "--runtime-dir", str(runtime),
         "--state-dir", str(base / "hstate")],
        base / "host.log",
    )  # fmt: skip
    try:

        def serving_with_host() -> re.Match[str] | None:
            """The front's URL line, once it has admitted the host."""
            for process, name in ((front, "front"), (host, "host")):
                assert process.poll() is None, (base / f"{name}.log").read_text()
            log = (base / "front.log").read_text()
            return URL_LINE.search(log) if "kernel host capped admitted" in log else None

        url = wait_for(serving_with_host, timeout=60)["url"]
        with open(f"/proc/{front.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Uid"].split()[0] == str(front_user["runAsUser"])
        assert int(status["CapBnd"], 16) == 0 and int(status["NoNewPrivs"]) == 1
        with open(f"/proc/{host.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        expected = sum(1 << CAPABILITIES[name] for name in added)
        assert int(status["CapBnd"], 16) == expected
        assert int(status["CapEff"], 16) == expected

        with Client(url, token) as client, client.start() as kernel:
            probe = kernel.execute(
                "import os, socket, subprocess\n"
                "print(os.getuid(), os.getgid(), os.getgroups())\n"
                "print([name for _, name in socket.if_nameindex()])\n"
                "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
                "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                "os.makedirs('locked/deep'); os.chmod('locked', 0)\n",
                timeout=60,
            )
            assert probe.status == "ok", probe.error
            ids, interfaces, capabilities = probe.stdout.splitlines()
            uid = int(ids.split()[0])
            assert PRIVATE_UIDS[0] <= uid <= PRIVATE_UIDS[1]
            assert ids == f"{uid} {uid} []"  # its own uid and gid, no groups
            assert interfaces == "['lo']"  # a network namespace of its own
            assert int(capabilities, 16) == 0
            assert _processes_of(uid)
            kernel_id = kernel.kernel_id
            client.delete_kernel(kernel_id)
        # Its processes (even one in a session of its own) and its directory
        # (even one it locked) are gone: KILL and DAC_OVERRIDE at work.
        wait_for(lambda: not _processes_of(uid), timeout=20)
        wait_for(lambda: not os.listdir(runtime / "kernels"), timeout=20)
    finally:
        _stop(host)
        _stop(front)
