"""The deployment artifacts: Dockerfile, Terraform module, Kubernetes manifests.

The image is built and run in tests/test_image.py, and the Terraform module validated and
planned in tests/test_terraform.py; no Kubernetes cluster runs here. What is checked here,
statically and in seconds:

- every file parses (python-hcl2 for .tf, PyYAML for manifests), and every Terraform reference
  (var., local., module., data., resources) names something declared;
- the linters pass: hadolint on the Dockerfile, checkov on both deploy trees (every skip carries
  its reason beside it);
- the ports, probe paths, uid and paths in all three agree with relay.config.defaults, which is
  what the relay itself listens on.

checkov and hadolint live in their own venv (.venv-tools, built by `make` from
requirements-tools.txt); the Makefile passes its bin directory as RELAY_TOOLS_BIN.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import hcl2
except ImportError:  # a collection error that says what to do, not a silent skip
    pytest.fail("python-hcl2 is not installed: it belongs in the `test` extra", pytrace=False)

from relay.config import defaults

pytestmark = pytest.mark.binaries

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TERRAFORM = ROOT / "deploy" / "terraform"
KUBERNETES = ROOT / "deploy" / "kubernetes"

SMTP_PORTS = {defaults.SUBMISSION_PORT, defaults.SUBMISSIONS_PORT}
ALL_PORTS = SMTP_PORTS | {defaults.METRICS_PORT}
HEALTH_URL = f"http://127.0.0.1:{defaults.METRICS_PORT}{defaults.HEALTH_PATH}"


# ---------------------------------------------------------------------------------------------
# External linters
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a linter: $RELAY_TOOLS_BIN, then ./.venv-tools/bin, then PATH; else fail."""
    tools_bin = os.environ.get("RELAY_TOOLS_BIN")
    candidates = [Path(tools_bin) / name] if tools_bin else []
    candidates.append(ROOT / ".venv-tools" / "bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"`{name}` not found (RELAY_TOOLS_BIN={tools_bin!r}, .venv-tools/bin, PATH). "
        "Build the tools venv: `make test` does it, or "
        "`python3 -m venv .venv-tools && .venv-tools/bin/pip install -r requirements-tools.txt`."
    )


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=170)


def _checkov(directory: Path) -> None:
    # --skip-download: checkov otherwise fetches guideline mappings from its vendor's API; the
    # machines here reach package registries only, and the result must not depend on it.
    result = _run(
        [
            _tool("checkov"),
            "-d",
            str(directory.relative_to(ROOT)),
            "--quiet",
            "--compact",
            "--skip-download",
        ]
    )
    assert result.returncode == 0, (
        f"checkov failed on {directory.relative_to(ROOT)} (exit {result.returncode}). Fix the "
        "finding, or skip it beside the resource with its reason.\n"
        f"{result.stdout}\n{result.stderr[-3000:]}"
    )


def test_hadolint_passes() -> None:
    result = _run([_tool("hadolint"), str(DOCKERFILE.relative_to(ROOT))])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerignore_keeps_the_context_small_but_sufficient() -> None:
    # Checked by reading both files, so a mistake names the pattern (test_image.py builds it).
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (".git", ".venv", ".venv-tools", "tests", "bench"):
        assert excluded in patterns, f".dockerignore must exclude {excluded}"
    copied = [
        source
        for keyword, rest in _dockerfile_instructions()
        if keyword == "COPY" and "--from=" not in rest
        for source in rest.split()[:-1]
    ]
    assert copied, "the Dockerfile copies nothing from the context"
    for source in copied:
        assert source not in patterns, f".dockerignore drops {source}, which the Dockerfile copies"
        # README.md is copied because pyproject.toml names it (`pip install .` reads it); it is
        # the one source allowed to be missing while the README is being written.
        assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: not in the repo"


def test_checkov_terraform_passes() -> None:
    _checkov(TERRAFORM)


def test_checkov_kubernetes_passes() -> None:
    _checkov(KUBERNETES)


# ---------------------------------------------------------------------------------------------
# Terraform: parsing and references
# ---------------------------------------------------------------------------------------------


def _unquote(text: str) -> str:
    # python-hcl2 7+ keeps the quotes of string literals and block labels; 4.x drops them.
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _normalize(node: Any) -> Any:
    """python-hcl2 output, the same for every supported version: no quotes, no metadata keys."""
    if isinstance(node, dict):
        return {_unquote(k): _normalize(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [_normalize(v) for v in node]
    if isinstance(node, str):
        return _unquote(node)
    return node


class Module:
    """The declarations of one Terraform module directory, parsed with python-hcl2."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[Path, dict[str, Any]] = {}
        for path in sorted(directory.glob("*.tf")):
            with path.open() as handle:
                self.files[path] = _normalize(hcl2.load(handle))
        self.variables: dict[str, dict[str, Any]] = {}
        self.locals: dict[str, Any] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.provider_prefixes: set[str] = set()
        for tree in self.files.values():
            for block in tree.get("variable", []):
                self.variables.update(block)
            for block in tree.get("locals", []):
                self.locals.update(block)
            for block in tree.get("output", []):
                self.outputs.update(block)
            for block in tree.get("module", []):
                self.modules.update(block)
            for kind, target in (("data", self.data), ("resource", self.resources)):
                for block in tree.get(kind, []):
                    for rtype, named in block.items():
                        for rname, body in named.items():
                            target[(rtype, rname)] = body
            for block in tree.get("terraform", []):
                for providers in block.get("required_providers", []):
                    self.provider_prefixes.update(f"{name}_" for name in providers)

    def resources_of(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: body for (kind, name), body in self.resources.items() if kind == rtype}


def _module_dirs() -> list[Path]:
    return sorted({path.parent for path in TERRAFORM.rglob("*.tf")})


def _strings(node: Any):
    """Every string in a parsed tree that holds an expression (literal text cannot refer)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str) and "${" in node:
        yield node


VAR_REF = re.compile(r"\bvar\.([A-Za-z_][\w-]*)")
LOCAL_REF = re.compile(r"\blocal\.([A-Za-z_][\w-]*)")
MODULE_REF = re.compile(r"\bmodule\.([A-Za-z_][\w-]*)(?:\.([A-Za-z_][\w-]*))?")
DATA_REF = re.compile(r"\bdata\.([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)")
# A resource reference is TYPE.NAME with a provider-prefixed TYPE not itself after a dot
# (data.aws_x.y is a data reference; x.aws_y is an attribute).
RESOURCE_REF = re.compile(r"(?<![\w.])([a-z][a-z0-9]*_[a-z0-9_]+)\.([A-Za-z_][\w-]*)")


@pytest.mark.parametrize("directory", _module_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_terraform_parses_and_every_reference_is_declared(directory: Path) -> None:
    module = Module(directory)
    assert module.files, f"no .tf files in {directory}"
    problems: list[str] = []
    used_vars: set[str] = set()
    used_locals: set[str] = set()
    for path, tree in module.files.items():
        where = path.relative_to(ROOT)
        for text in _strings(tree):
            for name in VAR_REF.findall(text):
                used_vars.add(name)
                if name not in module.variables:
                    problems.append(f"{where}: var.{name} is not declared")
            for name in LOCAL_REF.findall(text):
                used_locals.add(name)
                if name not in module.locals:
                    problems.append(f"{where}: local.{name} is not declared")
            for name, output in MODULE_REF.findall(text):
                if name not in module.modules:
                    problems.append(f"{where}: module.{name} is not declared")
                elif output:
                    called = Module((directory / module.modules[name]["source"]).resolve())
                    if output not in called.outputs:
                        problems.append(f"{where}: module.{name} has no output {output}")
            for rtype, rname in DATA_REF.findall(text):
                if (rtype, rname) not in module.data:
                    problems.append(f"{where}: data.{rtype}.{rname} is not declared")
            for rtype, rname in RESOURCE_REF.findall(text):
                if not any(rtype.startswith(p) for p in module.provider_prefixes):
                    continue
                if (rtype, rname) not in module.resources:
                    problems.append(f"{where}: resource {rtype}.{rname} is not declared")
    # The other direction: a declared input or local nothing reads is a knob that does nothing.
    problems += [f"variable {n} is never used" for n in sorted(set(module.variables) - used_vars)]
    problems += [f"local {n} is never used" for n in sorted(set(module.locals) - used_locals)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("directory", _module_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_terraform_module_calls_match_the_called_module(directory: Path) -> None:
    """Each module block passes only declared inputs, and every required one (terraform validate
    checks it too, in test_terraform.py; this says which input in one line)."""
    module = Module(directory)
    problems: list[str] = []
    for name, call in module.modules.items():
        called = Module((directory / call["source"]).resolve())
        meta = {"source", "version", "providers", "count", "for_each", "depends_on"}
        passed = set(call) - meta
        problems += [f"module.{name}: unknown input {k}" for k in sorted(passed - set(called.variables))]
        required = {k for k, v in called.variables.items() if "default" not in v}
        problems += [f"module.{name}: missing input {k}" for k in sorted(required - passed)]
    assert not problems, "\n".join(problems)


def test_terraform_variables_and_outputs_are_documented() -> None:
    module = Module(TERRAFORM)
    readme = (TERRAFORM / "README.md").read_text()
    problems = [f"variable {n} has no description" for n, v in module.variables.items() if not v.get("description")]
    problems += [f"variable {n} has no type" for n, v in module.variables.items() if "type" not in v]
    problems += [f"output {n} has no description" for n, v in module.outputs.items() if not v.get("description")]
    problems += [
        f"README.md does not list `{n}`" for n in [*module.variables, *module.outputs] if f"`{n}`" not in readme
    ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Kubernetes: parsing
# ---------------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_parses(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no document"
    for doc in documents:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without a name"


@pytest.mark.parametrize(
    "kustomization",
    sorted(KUBERNETES.rglob("kustomization.yaml")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_kustomization_lists_existing_files(kustomization: Path) -> None:
    resources = _documents(kustomization)[0]["resources"]
    missing = [r for r in resources if not (kustomization.parent / r).is_file()]
    assert not missing, f"{kustomization}: resources not found: {missing}"


def test_config_maps_hold_valid_yaml() -> None:
    for path in _manifest_files():
        for doc in _documents(path):
            if doc["kind"] == "ConfigMap":
                config = yaml.safe_load(doc["data"]["relay.yaml"])
                assert config["listeners"], f"{path}: relay.yaml without listeners"


# ---------------------------------------------------------------------------------------------
# One contract, three deployments: everything agrees with relay.config.defaults
# ---------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, rest = text.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
    return lines


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _by_kind(directory: Path, kind: str, recursive: bool = False) -> list[dict[str, Any]]:
    paths = directory.rglob("*.yaml") if recursive else directory.glob("*.yaml")
    return [doc for path in sorted(paths) for doc in _documents(path) if doc["kind"] == kind]


def _named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _probe(container: dict[str, Any], probe: str) -> tuple[str, int]:
    http = container[probe]["httpGet"]
    port = http["port"]
    return http["path"], _named_ports(container)[port] if isinstance(port, str) else port


class Resolver:
    """Evaluates the few Terraform expression forms the ports are written in:
    literals, ${local.X}, ${var.X} (its default), ${each.value} within a for_each over a local."""

    EXPR = re.compile(r"^\$\{(.+)\}$")
    INTERPOLATION = re.compile(r"\$\{(local|var)\.([A-Za-z_][\w-]*)\}")

    def __init__(self, module: Module) -> None:
        self.module = module

    def value(self, node: Any, each: Any = None) -> Any:
        if not isinstance(node, str):
            return node
        match = self.EXPR.match(node)
        if not match or "${" in match.group(1):
            return self.INTERPOLATION.sub(lambda m: str(self.value(f"${{{m[1]}.{m[2]}}}")), node)
        expr = match.group(1).strip()
        if expr == "each.value":
            return each
        kind, _, name = expr.partition(".")
        if kind == "local":
            return self.value(self.module.locals[name])
        if kind == "var":
            return self.value(self.module.variables[name]["default"])
        raise AssertionError(f"cannot evaluate {node!r} statically")

    def for_each_values(self, body: dict[str, Any]) -> list[Any]:
        collection = self.value(body["for_each"])
        items = collection.values() if isinstance(collection, dict) else collection
        return [self.value(v) for v in items]

    def ports(self, body: dict[str, Any], key: str = "port") -> set[int]:
        if "for_each" in body and body[key] == "${each.value}":
            return {int(v) for v in self.for_each_values(body)}
        return {int(self.value(body[key]))}


def test_ports_paths_and_uid_agree_across_image_kubernetes_and_terraform() -> None:
    # --- Dockerfile ---------------------------------------------------------------------------
    instructions = _dockerfile_instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in final_stage:
        by_keyword.setdefault(keyword, []).append(rest)

    assert {int(p.split("/")[0]) for e in by_keyword["EXPOSE"] for p in e.split()} == ALL_PORTS
    assert by_keyword["USER"] == [f"{defaults.IMAGE_UID}:{defaults.IMAGE_UID}"]
    (healthcheck,) = by_keyword["HEALTHCHECK"]
    assert re.findall(r"https?://[^'\" ]+", healthcheck) == [HEALTH_URL]
    assert json.loads(by_keyword["VOLUME"][0]) == [defaults.IMAGE_DATA_DIR]
    env = {k: v for line in by_keyword["ENV"] for k, _, v in (token.partition("=") for token in shlex.split(line))}
    assert env["RELAY_CONFIG"] == defaults.IMAGE_CONFIG_PATH
    assert env["TMPDIR"].startswith(defaults.IMAGE_DATA_DIR)  # the only writable path
    assert json.loads(by_keyword["ENTRYPOINT"][0]) == ["relay"]
    cmd = json.loads(by_keyword["CMD"][0])
    assert cmd[0] == "serve" and ("-c" not in cmd or cmd[cmd.index("-c") + 1] == defaults.IMAGE_CONFIG_PATH)
    # Both stages start from BASE_IMAGE, whose default is the pinned official image.
    base_args = [rest for keyword, rest in instructions if keyword == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert len(base_args) == 1, "the Dockerfile declares ARG BASE_IMAGE=<pinned image> once, before FROM"
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base_args[0])
    for keyword, rest in instructions:
        if keyword == "FROM":
            assert rest.split()[0] == "${BASE_IMAGE}", f"a stage not on BASE_IMAGE: {rest}"

    # --- Kubernetes: the shared service ------------------------------------------------------
    (deployment,) = [d for d in _by_kind(KUBERNETES, "Deployment") if d["metadata"]["name"] == "relay"]
    pod = deployment["spec"]["template"]["spec"]
    (relay,) = [c for c in pod["containers"] if c["name"] == "relay"]
    container_ports = _named_ports(relay)
    assert set(container_ports.values()) == ALL_PORTS
    assert _probe(relay, "livenessProbe") == (defaults.HEALTH_PATH, defaults.METRICS_PORT)
    assert _probe(relay, "readinessProbe") == (defaults.READY_PATH, defaults.METRICS_PORT)
    assert pod["securityContext"]["runAsUser"] == defaults.IMAGE_UID
    assert relay["securityContext"]["runAsUser"] == defaults.IMAGE_UID
    assert relay["args"][relay["args"].index("-c") + 1] == defaults.IMAGE_CONFIG_PATH
    mounts = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}
    assert defaults.IMAGE_DATA_DIR in mounts
    assert os.path.dirname(defaults.IMAGE_CONFIG_PATH) in mounts

    (service,) = _by_kind(KUBERNETES, "Service")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        target = port["targetPort"]
        assert (container_ports[target] if isinstance(target, str) else target) == port["port"]
    assert {p["port"] for p in service_ports.values()} == ALL_PORTS

    (monitor,) = _by_kind(KUBERNETES, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert service_ports[endpoint["port"]]["port"] == defaults.METRICS_PORT
    assert endpoint["path"] == defaults.METRICS_PATH
    (rule_file,) = _by_kind(KUBERNETES, "PrometheusRule")
    exprs = [r["expr"] for g in rule_file["spec"]["groups"] for r in g["rules"]]
    assert any(f'job="{service["metadata"]["name"]}"' in e for e in exprs)

    (policy,) = [p for p in _by_kind(KUBERNETES, "NetworkPolicy") if p["metadata"]["name"] == "relay"]
    ingress_ports = [{p["port"] for p in rule["ports"]} for rule in policy["spec"]["ingress"]]
    assert sorted(ingress_ports, key=len) == [{defaults.METRICS_PORT}, SMTP_PORTS]

    (config_map,) = [c for c in _by_kind(KUBERNETES, "ConfigMap") if c["metadata"]["name"] == "relay-config"]
    config = yaml.safe_load(config_map["data"]["relay.yaml"])
    assert {_port_of(listener["bind"]) for listener in config["listeners"]} == SMTP_PORTS
    assert _port_of(config["metrics"]["bind"]) == defaults.METRICS_PORT

    # --- Kubernetes: the sidecar example -----------------------------------------------------
    sidecar_dir = KUBERNETES / "sidecar"
    (app_deployment,) = _by_kind(sidecar_dir, "Deployment")
    app_pod = app_deployment["spec"]["template"]["spec"]
    all_containers = app_pod.get("initContainers", []) + app_pod["containers"]
    (sidecar,) = [c for c in all_containers if c["image"].split("@")[0].rsplit(":", 1)[0].endswith("/relay")]
    assert _probe(sidecar, "livenessProbe") == (defaults.HEALTH_PATH, defaults.METRICS_PORT)
    assert _probe(sidecar, "readinessProbe") == (defaults.READY_PATH, defaults.METRICS_PORT)
    assert sidecar["securityContext"]["runAsUser"] == defaults.IMAGE_UID
    (sidecar_config_map,) = _by_kind(sidecar_dir, "ConfigMap")
    sidecar_config = yaml.safe_load(sidecar_config_map["data"]["relay.yaml"])
    (listener,) = sidecar_config["listeners"]
    assert listener["bind"].startswith("127.0.0.1:")  # tls: none / auth: none only on loopback
    assert (listener["tls"], listener["auth"]) == ("none", "none")
    assert _port_of(sidecar_config["metrics"]["bind"]) == defaults.METRICS_PORT
    (app,) = [c for c in app_pod["containers"] if c is not sidecar]
    app_env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert (app_env["SMTP_HOST"], int(app_env["SMTP_PORT"])) == (
        "localhost",
        _port_of(listener["bind"]),
    )

    # --- Terraform ---------------------------------------------------------------------------
    module = Module(TERRAFORM)
    resolve = Resolver(module)
    assert resolve.value("${local.submission_port}") == defaults.SUBMISSION_PORT
    assert resolve.value("${local.submissions_port}") == defaults.SUBMISSIONS_PORT
    assert resolve.value("${local.metrics_port}") == defaults.METRICS_PORT

    listener_ports: set[int] = set()
    for body in module.resources_of("aws_lb_listener").values():
        assert body["protocol"] == "TCP"  # TLS terminates in the relay
        listener_ports |= resolve.ports(body)
    assert listener_ports == SMTP_PORTS

    target_ports: set[int] = set()
    for body in module.resources_of("aws_lb_target_group").values():
        target_ports |= resolve.ports(body)
        (check,) = body["health_check"]
        assert check["protocol"] == "HTTP"
        assert int(resolve.value(check["port"])) == defaults.METRICS_PORT
        assert resolve.value(check["path"]) == defaults.READY_PATH
    assert target_ports == SMTP_PORTS

    container = module.locals["relay_container"]
    mapped = {int(resolve.value(m["containerPort"])) for m in container["portMappings"]}
    assert mapped == ALL_PORTS
    assert all(resolve.value(m["hostPort"]) == resolve.value(m["containerPort"]) for m in container["portMappings"])
    health_command = " ".join(resolve.value(part) for part in container["healthCheck"]["command"])
    assert re.findall(r"https?://[^'\" ]+", health_command) == [HEALTH_URL]
    assert resolve.value(container["user"]) == f"{defaults.IMAGE_UID}:{defaults.IMAGE_UID}"
    assert container["readonlyRootFilesystem"] is True
    # The scratch volume at the data dir; with spool_efs, the spool inside it at queue.dir.
    mounts = container["mountPoints"]
    assert re.findall(r"containerPath = local\.(\w+)", mounts) == ["data_dir", "spool_dir"], mounts
    assert resolve.value("${local.data_dir}") == defaults.IMAGE_DATA_DIR
    assert resolve.value(module.locals["spool_dir"]) == f"{defaults.IMAGE_DATA_DIR}/spool"

    def rule_ports(kind: str, group: str) -> set[int]:
        ports: set[int] = set()
        for body in module.resources_of(kind).values():
            if body["security_group_id"] == f"${{aws_security_group.{group}.id}}":
                low, high = resolve.ports(body, "from_port"), resolve.ports(body, "to_port")
                assert low == high, f"{kind} on {group}: a port range {low}-{high}"
                ports |= low
        return ports

    assert rule_ports("aws_vpc_security_group_ingress_rule", "relay") == ALL_PORTS
    assert rule_ports("aws_vpc_security_group_ingress_rule", "nlb") == SMTP_PORTS
    assert rule_ports("aws_vpc_security_group_egress_rule", "nlb") == ALL_PORTS

    template = (TERRAFORM / "examples" / "vpc-service" / "relay.yaml.tftpl").read_text()
    example_config = yaml.safe_load(re.sub(r"\$\{[^}]*\}", "x", template))
    assert {_port_of(listener["bind"]) for listener in example_config["listeners"]} == SMTP_PORTS
    assert _port_of(example_config["metrics"]["bind"]) == defaults.METRICS_PORT
    assert example_config["tls"]["cert_file"].startswith(defaults.IMAGE_DATA_DIR)
