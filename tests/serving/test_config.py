"""Server config: TOML/YAML files, validation messages, relative paths, overrides, tokens."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from xai_serve.errors import InvalidInput, NotFound
from xai_serve.models import ModelConfig, TransformConfig, bundled_model_config
from xai_serve.serving.config import (
    AuthConfig,
    CacheConfig,
    LimitsConfig,
    ServerConfig,
    TlsConfig,
    config_from_dict,
    load_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]

FULL_TOML = """\
host = "127.0.0.1"
port = 6000
model_dirs = ["models"]
metrics_port = 9100
metrics_host = "0.0.0.0"
grace_s = 2.5
max_connection_age_s = 120
warmup = false
log_level = "debug"

[limits]
max_message_bytes = 1048576
max_image_pixels = 1000000
max_tensor_elements = 300000
max_samples = 512
max_steps = 64
max_queue = 32
max_top_k = 10

[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "/etc/ca.pem"

[auth]
tokens_file = "tokens.txt"
tokens_env = "XAI_TOKENS"

[[models]]
name = "efficientnet_lite0"
source = "bundled"

[[models]]
name = "digits"
source = "torchscript"
path = "models/digits.pt"
input_size = [28, 28]
device = "cpu"
max_batch_size = 8
max_delay_ms = 2

[models.transform]
resize = false
crop = false
grayscale = true
mean = 0.5
std = 0.5
"""

FULL_YAML = """\
host: 127.0.0.1
port: 6000
model_dirs: [models]
metrics_port: 9100
metrics_host: 0.0.0.0
grace_s: 2.5
max_connection_age_s: 120
warmup: false
log_level: debug
limits:
  max_message_bytes: 1048576
  max_image_pixels: 1000000
  max_tensor_elements: 300000
  max_samples: 512
  max_steps: 64
  max_queue: 32
  max_top_k: 10
tls:
  cert: certs/server.pem
  key: certs/server.key
  client_ca: /etc/ca.pem
auth:
  tokens_file: tokens.txt
  tokens_env: XAI_TOKENS
models:
  - name: efficientnet_lite0
    source: bundled
  - name: digits
    source: torchscript
    path: models/digits.pt
    input_size: [28, 28]
    device: cpu
    max_batch_size: 8
    max_delay_ms: 2
    transform:
      resize: false
      crop: false
      grayscale: true
      mean: 0.5
      std: 0.5
"""


def _expected(d: Path) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=6000,
        models=(
            bundled_model_config(),
            ModelConfig(
                name="digits",
                source="torchscript",
                path=str(d / "models" / "digits.pt"),
                input_size=(28, 28),
                transform=TransformConfig(
                    resize=None, crop=None, grayscale=True, mean=(0.5,), std=(0.5,)
                ),
                device="cpu",
                max_batch_size=8,
                max_delay_ms=2.0,
            ),
        ),
        model_dirs=(str(d / "models"),),
        limits=LimitsConfig(
            max_message_bytes=1 << 20,
            max_image_pixels=1_000_000,
            max_tensor_elements=300_000,
            max_samples=512,
            max_steps=64,
            max_queue=32,
            max_top_k=10,
        ),
        tls=TlsConfig(
            cert=str(d / "certs" / "server.pem"),
            key=str(d / "certs" / "server.key"),
            client_ca="/etc/ca.pem",
        ),
        auth=AuthConfig(tokens_file=str(d / "tokens.txt"), tokens_env="XAI_TOKENS"),
        metrics_port=9100,
        metrics_host="0.0.0.0",
        grace_s=2.5,
        max_connection_age_s=120.0,
        warmup=False,
        log_level="DEBUG",
    )


def _write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


def _dict(**kw: object) -> dict[str, object]:
    return dict(kw)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("s.toml", FULL_TOML), ("s.yaml", FULL_YAML)])
def test_file_sets_everything(tmp_path: Path, name: str, text: str) -> None:
    cfg = load_config(_write(tmp_path, name, text))
    assert cfg == _expected(tmp_path.resolve())
    assert cfg.model("digits").transform.channels == 1


def test_toml_and_yaml_give_equal_configs(tmp_path: Path) -> None:
    a = load_config(_write(tmp_path, "a.toml", FULL_TOML))
    b = load_config(_write(tmp_path, "b.yml", FULL_YAML))
    assert a == b


def test_defaults() -> None:
    cfg = config_from_dict({})
    assert cfg == ServerConfig()
    assert cfg.models == (bundled_model_config(),)
    assert (cfg.host, cfg.port, cfg.metrics_port, cfg.tls, cfg.auth) == (
        "0.0.0.0", 50051, None, None, None,
    )  # fmt: skip
    assert cfg.limits.max_message_bytes == 64 * 1024 * 1024
    assert cfg.limits.max_queue == 256
    assert (cfg.grace_s, cfg.warmup, cfg.log_level, cfg.model_dirs) == (10.0, True, "INFO", ())
    assert cfg.max_connection_age_s is None


def test_empty_yaml_is_the_default_config(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "e.yaml", "# nothing\n")) == ServerConfig()


def test_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(InvalidInput, match=r"unknown suffix '\.json'.*\.toml, \.yaml or \.yml"):
        load_config(_write(tmp_path, "c.json", "{}"))


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.toml", 'host = "x"\nport = 1\nmax_queue = = 3\n')
    with pytest.raises(InvalidInput, match=r"bad\.toml: invalid TOML: .*line 3") as e:
        load_config(p)
    assert e.value.__cause__ is None or "Traceback" not in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.yaml", "host: x\nlimits:\n  max_queue: [1, 2\nport: 3\n")
    with pytest.raises(InvalidInput, match=r"bad\.yaml: invalid YAML at line \d+, column \d+"):
        load_config(p)
    with pytest.raises(InvalidInput, match="top level must be a mapping"):
        load_config(_write(tmp_path, "list.yaml", "- a\n- b\n"))


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.toml", '[limits]\nmax_queue = "x"\n')
    with pytest.raises(InvalidInput) as e:
        load_config(p)
    assert str(e.value) == f"{p}: limits.max_queue must be a positive integer, got 'x'"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "key"),
    [
        (_dict(prot=1), "prot"),
        (_dict(limits={"max_queu": 3}), "limits.max_queu"),
        (_dict(tls={"cert": "a", "key": "b", "ca": "c"}), "tls.ca"),
        (_dict(auth={"tokens": "x"}), "auth.tokens"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(d: dict[str, object], key: str) -> None:
    with pytest.raises(InvalidInput, match=f"unknown config key '{re.escape(key)}'") as e:
        config_from_dict(d)
    msg = str(e.value)
    section = key.rpartition(".")[0]
    cls = {"": ServerConfig, "limits": LimitsConfig, "tls": TlsConfig, "auth": AuthConfig}
    for f in dataclasses.fields(cls[section]):
        assert f.name in msg.rpartition("valid keys")[2]


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(InvalidInput, match=r"did you mean 'limits\.max_queue'"):
        config_from_dict({"limits": {"max_queu": 3}})


@pytest.mark.parametrize(
    ("d", "message"),
    [
        (_dict(limits={"max_queue": "x"}), "limits.max_queue must be a positive integer, got 'x'"),
        (_dict(limits={"max_steps": 0}), "limits.max_steps must be a positive integer, got 0"),
        (_dict(limits={"max_top_k": True}), "limits.max_top_k must be a positive integer"),
        (_dict(limits=[1]), "limits must be a table/mapping"),
        (_dict(port=70000), "port must be an integer in 0..65535, got 70000"),
        (_dict(port="50051"), "port must be an integer in 0..65535, got '50051'"),
        (_dict(metrics_port=-1), "metrics_port must be an integer in 0..65535, got -1"),
        (_dict(host=""), "host must be a non-empty string"),
        (_dict(grace_s=-1), "grace_s must be a number >= 0, got -1"),
        (_dict(max_connection_age_s=0), "max_connection_age_s must be a number >= 0.001, got 0"),
        (_dict(max_connection_age_s="5m"), "max_connection_age_s must be a number >= 0.001"),
        (_dict(max_connection_age_s=float("inf")), "max_connection_age_s must be a finite"),
        (_dict(warmup="yes"), "warmup must be true or false, got 'yes'"),
        (_dict(log_level="loud"), "log_level must be one of DEBUG, INFO, WARNING"),
        (_dict(model_dirs="models"), "model_dirs must be a list of strings"),
        (_dict(model_dirs=[3]), "model_dirs[0] must be a non-empty string, got 3"),
        (_dict(tls={"cert": "a"}), "tls.key is required"),
        (_dict(tls={"cert": 1, "key": "k"}), "tls.cert must be a non-empty string, got 1"),
        (_dict(auth={}), "auth needs auth.tokens_file or auth.tokens_env"),
        (_dict(models={"name": "x"}), "models must be an array of tables"),
        (_dict(models=[]), "models must list at least one model"),
        (_dict(models=["x"]), "models[0] must be a table/mapping"),
        (_dict(models=[{"name": "m", "source": "bundled", "max_batch_size": 0}]),
         "models[m].max_batch_size must be a positive integer, got 0"),
        (_dict(models=[{"name": "m", "source": "bundled"}] * 2),
         "models: the name 'm' is used twice"),
    ],
)  # fmt: skip
def test_bad_values_are_named(d: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        config_from_dict(d)


def test_dataclasses_validate_when_built_in_python() -> None:
    with pytest.raises(InvalidInput, match=r"limits\.max_queue"):
        LimitsConfig(max_queue=-5)
    with pytest.raises(InvalidInput, match="auth needs"):
        AuthConfig()
    with pytest.raises(InvalidInput, match="models must hold ModelConfig objects"):
        ServerConfig(models=({"name": "x"},))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="limits must be a LimitsConfig"):
        ServerConfig(limits={"max_queue": 1})  # type: ignore[arg-type]
    cfg = ServerConfig(log_level="warning", grace_s=3, model_dirs=["/m"])  # type: ignore[arg-type]
    assert (cfg.log_level, cfg.grace_s, cfg.model_dirs) == ("WARNING", 3.0, ("/m",))
    assert isinstance(cfg.grace_s, float)
    with pytest.raises(NotFound, match="efficientnet_lite0"):
        cfg.model("nope")


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    p = _write(
        sub,
        "s.toml",
        'model_dirs = ["m", "/abs/dir"]\n'
        '[tls]\ncert = "c.pem"\nkey = "../k.pem"\nclient_ca = "/etc/ca.pem"\n'
        '[auth]\ntokens_file = "t/tokens"\n'
        '[[models]]\nname = "n"\nsource = "export"\npath = "m/x.pt2"\n',
    )
    base = sub.resolve()
    cfg = load_config(p)
    assert cfg.model_dirs == (str(base / "m"), "/abs/dir")
    assert cfg.tls == TlsConfig(str(base / "c.pem"), str(base / ".." / "k.pem"), "/etc/ca.pem")
    assert cfg.auth == AuthConfig(tokens_file=str(base / "t" / "tokens"))
    # YAML null is "not set".
    y = _write(sub, "s.yaml", "tls: {cert: c.pem, key: k.pem, client_ca: null}\nauth: null\n")
    assert load_config(y).tls == TlsConfig(str(base / "c.pem"), str(base / "k.pem"))
    assert load_config(y).auth is None
    assert cfg.models[0].path == str(base / "m" / "x.pt2")
    # Without a base_dir, relative paths are kept as written (relative to the cwd).
    cfg2 = config_from_dict({"tls": {"cert": "c.pem", "key": "k.pem"}})
    assert cfg2.tls == TlsConfig("c.pem", "k.pem")


def test_model_files_must_lie_inside_model_dirs(tmp_path: Path) -> None:
    model = {"name": "n", "source": "torchscript", "path": "other/x.pt"}
    with pytest.raises(InvalidInput, match=r"models\['n'\]\.path .* not inside any of model_dirs"):
        config_from_dict({"model_dirs": ["models"], "models": [model]}, base_dir=tmp_path)
    # A '..' cannot climb out of a model dir.
    sneaky = dict(model, path="models/../other/x.pt")
    with pytest.raises(InvalidInput, match="not inside"):
        config_from_dict({"model_dirs": ["models"], "models": [sneaky]}, base_dir=tmp_path)
    ok = config_from_dict({"model_dirs": ["models", "other"], "models": [model]}, base_dir=tmp_path)
    assert ok.models[0].path == str(tmp_path / "other" / "x.pt")
    # Overriding the dirs re-checks; the bundled model has no file and is always allowed.
    with pytest.raises(InvalidInput, match="not inside"):
        with_overrides(ok, model_dirs=[str(tmp_path / "models")])
    assert with_overrides(ServerConfig(), model_dirs=["/nowhere"]).model_dirs == ("/nowhere",)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _two_models() -> ServerConfig:
    return config_from_dict(
        {
            "models": [
                {"name": "a", "source": "bundled"},
                {"name": "b", "source": "torchvision", "arch": "resnet18", "max_batch_size": 4},
            ]
        }
    )


def test_overrides_apply_to_every_model_and_to_limits() -> None:
    cfg = _two_models()
    out = with_overrides(
        cfg,
        max_batch_size=32,
        max_delay_ms=1,
        device="cpu",
        max_queue=8,
        max_samples=100,
        port=0,
        host="::1",
        metrics_port=0,
        grace_s=0,
        max_connection_age_s=60,
        warmup=False,
        log_level="error",
    )
    assert [(m.name, m.max_batch_size, m.max_delay_ms, m.device) for m in out.models] == [
        ("a", 32, 1.0, "cpu"),
        ("b", 32, 1.0, "cpu"),
    ]
    assert out.models[1].arch == "resnet18"  # everything else unchanged
    assert out.limits == dataclasses.replace(cfg.limits, max_queue=8, max_samples=100)
    assert (out.port, out.host, out.metrics_port, out.grace_s) == (0, "::1", 0, 0.0)
    assert (out.warmup, out.log_level, out.max_connection_age_s) == (False, "ERROR", 60.0)
    assert cfg.models[1].max_batch_size == 4  # the input is untouched (frozen)


def test_none_overrides_change_nothing() -> None:
    cfg = _two_models()
    assert with_overrides(cfg, port=None, device=None, max_queue=None, tls_cert=None) is cfg


def test_tls_and_auth_overrides() -> None:
    cfg = with_overrides(ServerConfig(), tls_cert="c.pem", tls_key="k.pem")
    assert cfg.tls == TlsConfig("c.pem", "k.pem")
    cfg = with_overrides(cfg, tls_client_ca="ca.pem")
    assert cfg.tls == TlsConfig("c.pem", "k.pem", "ca.pem")
    with pytest.raises(InvalidInput, match=r"--tls-cert, --tls-key"):
        with_overrides(ServerConfig(), tls_cert="c.pem")
    cfg = with_overrides(ServerConfig(), auth_tokens_env="TOK")
    assert cfg.auth == AuthConfig(tokens_env="TOK")
    cfg = with_overrides(cfg, auth_tokens_file="t.txt")
    assert cfg.auth == AuthConfig(tokens_file="t.txt", tokens_env="TOK")


def test_bad_overrides() -> None:
    with pytest.raises(InvalidInput, match="unknown config key 'max_batch'"):
        with_overrides(ServerConfig(), max_batch=3)
    with pytest.raises(InvalidInput, match="max_batch_size must be a positive integer, got 0"):
        with_overrides(ServerConfig(), max_batch_size=0)
    with pytest.raises(InvalidInput, match=r"limits\.max_queue must be a positive integer"):
        with_overrides(ServerConfig(), max_queue=-1)
    with pytest.raises(InvalidInput, match=r"port must be an integer in 0\.\.65535"):
        with_overrides(ServerConfig(), port=1 << 20)
    with pytest.raises(InvalidInput, match="device"):
        with_overrides(ServerConfig(), device="toaster")


def test_cache_table_from_files_flags_and_python(tmp_path: Path) -> None:
    assert ServerConfig().cache == CacheConfig(max_bytes=0)
    assert not ServerConfig().cache.enabled
    toml = load_config(_write(tmp_path, "c.toml", "[cache]\nmax_bytes = 1048576\n"))
    yaml = load_config(_write(tmp_path, "c.yaml", "cache: {max_bytes: 1048576}\n"))
    assert toml == yaml == ServerConfig(cache=CacheConfig(1 << 20))
    assert toml.cache.enabled
    assert with_overrides(toml, cache_bytes=0).cache == CacheConfig(0)
    assert with_overrides(ServerConfig(), cache_bytes=5).cache == CacheConfig(5)
    assert with_overrides(toml, cache_bytes=None) is toml


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: config_from_dict({"cache": {"max_bytes": -1}}),
         "cache.max_bytes must be an integer >= 0, got -1"),
        (lambda: config_from_dict({"cache": {"max_bytes": "256MiB"}}),
         "cache.max_bytes must be an integer >= 0, got '256MiB'"),
        (lambda: config_from_dict({"cache": {"max_bytes": True}}),
         "cache.max_bytes must be an integer >= 0, got True"),
        (lambda: config_from_dict({"cache": {"max_bytes": 1.5}}),
         "cache.max_bytes must be an integer >= 0, got 1.5"),
        (lambda: config_from_dict({"cache": 5}), "cache must be a table/mapping, got 5"),
        (lambda: config_from_dict({"cache": {"max_byte": 1}}),
         "unknown config key 'cache.max_byte' (did you mean 'cache.max_bytes'?)"),
        (lambda: with_overrides(ServerConfig(), cache_bytes=-3),
         "cache.max_bytes must be an integer >= 0, got -3"),
        (lambda: ServerConfig(cache=None), "cache must be a CacheConfig, got None"),
    ],
)  # fmt: skip
def test_bad_cache_values_are_named(build: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        build()


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def test_tokens_from_file_and_env(tmp_path: Path) -> None:
    f = _write(tmp_path, "tokens", "# clients\nalpha-1\n\n  beta_2  \n# gamma\n")
    assert AuthConfig(tokens_file=str(f)).load_tokens() == {"alpha-1", "beta_2"}
    env = {"TOK": " one, two ,,three"}
    assert AuthConfig(tokens_env="TOK").load_tokens(env) == {"one", "two", "three"}
    both = AuthConfig(tokens_file=str(f), tokens_env="TOK").load_tokens(env)
    assert both == {"alpha-1", "beta_2", "one", "two", "three"}


def test_tokens_from_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAI_TEST_TOKENS", "abc,def")
    assert AuthConfig(tokens_env="XAI_TEST_TOKENS").load_tokens() == {"abc", "def"}


def test_token_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"auth\.tokens_file: no such file"):
        AuthConfig(tokens_file=str(tmp_path / "missing")).load_tokens()
    empty = _write(tmp_path, "empty", "# only comments\n\n")
    with pytest.raises(InvalidInput, match=r"auth: no tokens .*has none.*\$NOPE is unset"):
        AuthConfig(tokens_file=str(empty), tokens_env="NOPE").load_tokens({})
    with pytest.raises(InvalidInput, match="no tokens"):
        AuthConfig(tokens_env="T").load_tokens({"T": " , "})
    spaced = _write(tmp_path, "spaced", "ok-token\nsecret with space\n")
    with pytest.raises(InvalidInput, match="line 2: a token must be printable ASCII") as e:
        AuthConfig(tokens_file=str(spaced)).load_tokens()
    assert "secret" not in str(e.value)
    with pytest.raises(InvalidInput, match=r"\$T item 2") as e:
        AuthConfig(tokens_env="T").load_tokens({"T": "good,caf\u00e9"})
    assert "caf" not in str(e.value)


# --------------------------------------------------------------------------------------------
# The shipped examples
# --------------------------------------------------------------------------------------------


def test_example_configs_load_and_agree() -> None:
    toml_cfg = load_config(REPO / "examples" / "server.toml")
    yaml_cfg = load_config(REPO / "examples" / "server.yaml")
    assert toml_cfg == yaml_cfg
    assert toml_cfg.models == (bundled_model_config(),)


def _uncomment(text: str, pattern: str) -> str:
    return re.sub(pattern, r"\1\2", text, flags=re.MULTILINE)


def test_commented_examples_are_valid_and_agree(tmp_path: Path) -> None:
    """Uncommenting every commented setting (tls, auth, model_dirs, the torchvision model, the
    model served elsewhere) of the examples still gives a valid config, the same from TOML and
    YAML."""
    toml_text = _uncomment(
        (REPO / "examples" / "server.toml").read_text(), r"^()# (\[.*\]|[a-z_]+ = .*)$"
    )
    yaml_text = _uncomment(
        (REPO / "examples" / "server.yaml").read_text(), r"^(\s*)# (\s*(?:- )?[a-z_]+:(?: .*)?)$"
    )
    a = load_config(_write(tmp_path, "server.toml", toml_text))
    b = load_config(_write(tmp_path, "server.yaml", yaml_text))
    assert a == b
    assert [m.name for m in a.models] == ["efficientnet_lite0", "resnet50", "remote_resnet50"]
    remote = a.model("remote_resnet50")
    assert remote.source == "oip" and remote.remote is not None
    assert remote.remote.url == "inference.example.com:8001"
    resnet = a.model("resnet50")
    assert (resnet.source, resnet.arch, resnet.layer, resnet.device) == (
        "torchvision", "resnet50", "layer4", "cuda",
    )  # fmt: skip
    assert resnet.path == str(tmp_path.resolve() / "models" / "resnet50.pth")
    assert a.model_dirs == (str(tmp_path.resolve() / "models"),)
    assert a.tls is not None and a.tls.client_ca == str(tmp_path.resolve() / "certs" / "ca.pem")
    assert a.auth == AuthConfig(str(tmp_path.resolve() / "tokens.txt"), "XAI_SERVE_TOKENS")
