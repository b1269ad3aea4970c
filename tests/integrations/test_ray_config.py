"""The ``[ray]`` table, the deployment options and Serve config file built from it,
``deploy/ray/server.toml`` checked against the code (and Ray's own schema), and
``xai-serve ray``."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests._peers import require
from tests.integrations.ray_helpers import write_config
from xai_serve.cli import main
from xai_serve.errors import InvalidInput
from xai_serve.integrations.ray import (
    APP_BUILDER,
    GRPC_SERVICER_FUNCTIONS,
    AutoscalingConfig,
    RayConfig,
    deployment_options,
    load_ray_config,
    ray_config_from_dict,
    serve_config,
)
from xai_serve.proto import explainer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "ray"


def test_module_imports_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None; import xai_serve.integrations.ray as r; "
        "print(r.DEPLOYMENT_NAME)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Explainer"


def test_defaults_without_a_ray_table(tmp_path: Path) -> None:
    server, cfg = load_ray_config(write_config(tmp_path))
    assert cfg == RayConfig()
    options = deployment_options(server, cfg)
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options["max_queued_requests"] == server.limits.max_queue == 256


def test_table_sets_replicas_resources_and_autoscaling(tmp_path: Path) -> None:
    table = """
[ray]
num_cpus = 2
resources = { gpu_box = 0.5 }
max_ongoing_requests = 24
[ray.autoscaling]
min_replicas = 1
max_replicas = 6
target_ongoing_requests = 12
"""
    server, cfg = load_ray_config(write_config(tmp_path, table))
    assert cfg.autoscaling == AutoscalingConfig(max_replicas=6, target_ongoing_requests=12.0)
    options = deployment_options(server, cfg)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 12.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }
    assert options["ray_actor_options"] == {
        "num_cpus": 2.0,
        "num_gpus": 0.0,
        "resources": {"gpu_box": 0.5},
    }
    assert options["max_ongoing_requests"] == 24


def test_a_cuda_model_takes_a_gpu_per_replica(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    text = path.read_text().replace('precision = "fp32"', 'precision = "fp32"\ndevice = "cuda"')
    path.write_text(text)
    server, cfg = load_ray_config(path)
    assert server.models[0].device == "cuda"
    assert deployment_options(server, cfg)["ray_actor_options"]["num_gpus"] == 1.0
    half = RayConfig(num_gpus=0.5)
    assert deployment_options(server, half)["ray_actor_options"]["num_gpus"] == 0.5


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"replicas": 2}, "unknown config key ray.replicas"),
        ({"num_replicas": 0}, "ray.num_replicas must be an integer >= 1"),
        ({"num_cpus": -1}, "ray.num_cpus must be a number >= 0"),
        ({"proxy_location": "Everywhere"}, "ray.proxy_location must be one of"),
        ({"grpc_port": 0}, "ray.grpc_port must be a port"),
        ({"route_prefix": "api"}, "ray.route_prefix must start with '/'"),
        ({"resources": {"GPU": 1}}, "not a custom resource name"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "exceeds max_replicas"),
        ({"autoscaling": {"target": 1}}, "unknown config key ray.autoscaling.target"),
    ],
)
def test_bad_values_name_their_key(table: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        ray_config_from_dict(table)


def test_other_tables_are_still_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, "\n[ray]\nnum_replicas = 2\n")
    path.write_text(path.read_text().replace("[limits]", "[limitz]"))
    with pytest.raises(InvalidInput, match="limitz"):
        load_ray_config(path)


def test_deploy_config_makes_a_serve_config_ray_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """deploy/ray/server.toml loads, and the Serve config file `xai-serve ray config` makes of
    it passes Ray's own schema and names what can be imported. (It is generated, not kept in
    deploy/: the server config is the one owner of the settings.)"""
    server, cfg = load_ray_config(DEPLOY / "server.toml")
    assert [m.name for m in server.models] == ["efficientnet_lite0"]
    assert cfg.num_replicas == 2 and cfg.grpc_port == 9000 and cfg.http_port == 8000
    args = ["ray", "config", "--config", str(DEPLOY / "server.toml")]
    assert main([*args, "--config-path", "/etc/xai-serve/server.toml"]) == 0
    written = yaml.safe_load(capsys.readouterr().out)
    assert written == serve_config("/etc/xai-serve/server.toml", cfg)
    module, attr = APP_BUILDER.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for path in written["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))
    assert written["grpc_options"]["grpc_servicer_functions"] == list(GRPC_SERVICER_FUNCTIONS)
    schema = require("ray.serve.schema")
    parsed = schema.ServeDeploySchema.model_validate(written)
    (app,) = parsed.applications
    assert app.import_path == APP_BUILDER and app.args == {"config": "/etc/xai-serve/server.toml"}
    assert parsed.grpc_options.port == 9000 and parsed.http_options.port == 8000


def test_messages_pickle_under_their_proto_module_name() -> None:
    """Serve pickles requests between its proxy and the replicas: pickle must find the class
    by the module name protobuf gives it (``make protos`` names it after the stubs' module),
    also in a fresh process that has imported nothing of ours."""
    assert pb.ExplainRequest.__module__ == "xai_serve.proto.explainer_pb2"
    blob = pickle.dumps(pb.ExplainRequest(model="tiny", request_id="7"))
    code = "import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); print(r.request_id)"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert out.stdout.strip() == b"7"
    req = pb.ExplainRequest(model="tiny", method="gradcam", request_id="7")
    assert pb.ExplainRequest.__module__ in sys.modules
    assert pickle.loads(pickle.dumps(req)) == req


def test_cli_ray_config_prints_the_serve_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, '\n[ray]\napp_name = "xs"\ngrpc_port = 9100\n')
    assert main(["ray", "config", "--config", str(path)]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["applications"][0]["args"] == {"config": str(path.resolve())}
    assert out["applications"][0]["name"] == "xs"
    assert out["grpc_options"]["port"] == 9100
    assert main(["ray", "config", "--config", str(path), "--config-path", "/c.toml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"] == {
        "config": "/c.toml"
    }


def test_cli_ray_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "\n[ray]\nnum_replicas = 0\n")
    assert main(["ray", "up", "--config", str(path)]) == 2
    assert "ray.num_replicas must be an integer >= 1" in capsys.readouterr().err
    assert main(["ray", "config", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = write_config(tmp_path)
    assert main(["ray", "up", "--config", str(good), "--detach"]) == 2
    assert "--detach needs a running cluster" in capsys.readouterr().err


def test_serve_accepts_the_deployment_options(tmp_path: Path) -> None:
    """Ray Serve's own checks take the options (replicas or autoscaling, resources)."""
    serve = require("ray.serve")
    from xai_serve.integrations._ray_replica import ExplainerReplica

    table = """
[ray]
resources = { xai_replica = 1.0 }
[ray.autoscaling]
max_replicas = 6
target_ongoing_requests = 12
"""
    server, cfg = load_ray_config(write_config(tmp_path, table))
    deployment = serve.deployment(ExplainerReplica).options(**deployment_options(server, cfg))
    config = deployment._deployment_config
    assert config.autoscaling_config.max_replicas == 6
    assert config.autoscaling_config.target_ongoing_requests == 12.0
    assert config.max_queued_requests == 256 and config.max_ongoing_requests == 64
    assert deployment.ray_actor_options["resources"] == {"xai_replica": 1.0}
    fixed = serve.deployment(ExplainerReplica).options(
        **deployment_options(server, RayConfig(num_replicas=3))
    )
    assert fixed.num_replicas == 3


def test_serve_reads_the_ray_example_and_ignores_its_ray_table() -> None:
    """deploy/ray/server.toml is one file for both commands: `xai-serve serve` takes its models
    and limits and leaves [ray] to `xai-serve ray` (which checks it); other unknown top-level
    keys are still refused."""
    from xai_serve.serving.config import config_from_dict, load_config

    path = Path(__file__).parents[2] / "deploy/ray/server.toml"
    cfg = load_config(path)
    assert [m.name for m in cfg.models] == ["efficientnet_lite0"]
    assert cfg.limits.max_queue == 256
    assert load_ray_config(path)[1].num_replicas == 2
    with pytest.raises(InvalidInput, match="unknown config key 'rayy'"):
        config_from_dict({"rayy": {}})


def test_examples_server_toml_shows_every_ray_key_with_its_default(tmp_path: Path) -> None:
    """examples/server.toml lists every config key with its default, [ray] too: uncommented,
    its [ray] table is RayConfig() exactly, and every field (autoscaling's included) is named."""
    import dataclasses
    import re

    from xai_serve.integrations.ray import AutoscalingConfig

    text = (Path(__file__).parents[2] / "examples" / "server.toml").read_text()
    block = text[text.index("# [ray]") :]
    uncommented = re.sub(r"^# (\[.*\]|[a-z_]+ = .*)$", r"\1", block, flags=re.MULTILINE)
    path = tmp_path / "server.toml"
    path.write_text(uncommented)
    _, cfg = load_ray_config(path)
    assert cfg == RayConfig()
    shown = set(re.findall(r"^(?:# )*\[?([a-z_.]+)(?: = |\])", block, flags=re.MULTILINE))
    fields = {f.name for f in dataclasses.fields(RayConfig)} - {"autoscaling"}
    fields |= {f.name for f in dataclasses.fields(AutoscalingConfig)} | {"ray.autoscaling"}
    assert fields <= shown, fields - shown
    # the YAML example says the same
    text = (Path(__file__).parents[2] / "examples" / "server.yaml").read_text()
    block = text[text.index("# ray:") :]
    yaml_path = tmp_path / "server.yaml"
    yaml_path.write_text(re.sub(r"^# (\s*[a-z_]+:(?: .*)?)$", r"\1", block, flags=re.MULTILINE))
    assert load_ray_config(yaml_path)[1] == RayConfig()
    assert yaml.safe_load(yaml_path.read_text())["ray"]["num_replicas"] == 1
