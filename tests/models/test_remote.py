"""Models served elsewhere (source ``"oip"``), through the library: config checks, loading
against a real KServe SDK model server, answers equal to the same model loaded here,
pipelined calls, deadlines, cancellation and every way a remote can fail.

The KServe servers run in their own processes (``tests/serving/kserve_cnn.py``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import xai_serve
from tests._peers import require_installed
from tests.serving.remote_servers import (
    CLASSES,
    INPUT,
    KServeProcess,
    local_config,
    remote_config,
    write_scripted,
)
from xai_serve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
)
from xai_serve.explainers.base import BlackBoxModel
from xai_serve.models import (
    LoadedModel,
    ModelConfig,
    RemoteConfig,
    RemoteModel,
    call_scope,
    load_model,
    model_config_from_dict,
)
from xai_serve.models.config import _REMOTE_KEYS
from xai_serve.serving.process import free_port

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

require_installed("kserve")

SEED = 5
BLACK_BOX = ("kernelshap", "lime", "occlusion")
OPTIONS = {
    "lime": {"samples": 96, "n_segments": 9, "segmenter": "grid"},
    "kernelshap": {"samples": 96, "n_segments": 9, "segmenter": "grid"},
    "occlusion": {"window": 8, "stride": 4},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def scripted(workdir: Path) -> Path:
    return write_scripted(workdir / "cnn.pt", seed=1)


@pytest.fixture(scope="module")
def kserve(workdir: Path, scripted: Path) -> Iterator[KServeProcess]:
    server = KServeProcess(workdir, scripted, name="cnn")
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(scripted: Path) -> LoadedModel:
    return load_model(local_config("local", scripted))


@pytest.fixture(scope="module")
def remote(kserve: KServeProcess) -> Iterator[LoadedModel]:
    model = load_model(remote_config("remote", kserve.address, model="cnn", max_batch=8))
    yield model
    assert model.remote is not None
    model.remote.close()


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *INPUT), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_reads_the_remote_table_with_its_defaults(tmp_path: Path) -> None:
    cfg = model_config_from_dict(
        {
            "name": "r",
            "source": "oip",
            "transform": {"resize": False, "crop": [32, 32]},
            "remote": {"url": "h:8001", "dtype": "fp16", "ca_file": "ca.pem", "max_batch": 4},
        },
        base_dir=tmp_path,
    )
    assert cfg.remote == RemoteConfig(
        url="h:8001", dtype="FP16", ca_file=str(tmp_path / "ca.pem"), max_batch=4
    )
    r = cfg.remote
    assert (r.model, r.version, r.input, r.output, r.layout) == (None, "", None, None, "NCHW")
    assert (r.in_flight, r.timeout_s, r.tls, r.token_env) == (4, 30.0, False, None)
    assert r.secure  # a ca_file means TLS


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"source": "oip"}, r"models\[r\]\.remote is required"),
        ({"source": "oip", "remote": {}}, r"models\[r\]\.remote\.url is required"),
        ({"source": "oip", "remote": {"url": "http://h:80"}}, "HTTP URL"),
        ({"source": "oip", "remote": {"url": "h:1", "layot": "NHWC"}}, "did you mean 'layout'"),
        ({"source": "oip", "remote": {"url": "h:1", "in_flight": 0}}, "in_flight must be a pos"),
        ({"source": "oip", "remote": {"url": "h:1", "timeout_s": 0}}, r"timeout_s must be > 0"),
        ({"source": "oip", "remote": {"url": "h:1", "dtype": "INT8"}}, "dtype must be one of"),
        ({"source": "oip", "remote": {"url": "h:1"}, "compile": "on"}, "served elsewhere"),
        ({"source": "oip", "remote": {"url": "h:1"}, "path": "m.pt"}, r"path must not be set"),
        (
            {"source": "torchvision", "arch": "resnet18", "remote": {"url": "h:1"}},
            'remote is only used with source "oip"',
        ),
    ],
)
def test_config_errors_name_the_key(table: dict, message: str) -> None:
    d = {"name": "r", "transform": {"resize": False, "crop": [32, 32]}, **table}
    with pytest.raises(InvalidInput, match=message):
        model_config_from_dict(d)


# --------------------------------------------------------------------------------------------
# Loading and answers against a real KServe model server
# --------------------------------------------------------------------------------------------


def test_load_reads_the_metadata_and_offers_only_black_box_methods(remote: LoadedModel) -> None:
    assert remote.num_classes == CLASSES
    assert remote.methods == BLACK_BOX
    assert remote.layers == () and remote.default_layer is None
    client = remote.remote
    assert client is not None
    assert (client.input_name, client.output_name, client.datatype) == ("input", "logits", "FP32")
    assert client.max_batch == 8 and remote.path.batch_size == 8
    assert remote.tune() is remote.path  # nothing to tune here


def test_remote_logits_equal_the_local_model(remote: LoadedModel, local: LoadedModel) -> None:
    x = _images(20)  # 3 calls of at most 8
    assert remote.remote is not None
    before = remote.remote.calls
    got = remote.module(x)
    assert remote.remote.calls - before == 3
    torch.testing.assert_close(got, local.module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", BLACK_BOX)
def test_black_box_methods_equal_the_local_answer(
    method: str, remote: LoadedModel, local: LoadedModel
) -> None:
    x = _images(2, seed=3)
    kw = {"seed": [SEED, SEED + 1], **OPTIONS[method]}
    got = xai_serve.explain(remote.module, x, method, path=remote.path, **kw)
    want = xai_serve.explain(local.module, x, method, path=local.path, **kw)
    assert torch.equal(got.targets, want.targets)
    assert want.maps.abs().max() > 0
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "gradcam", "integrated_gradients"])
def test_gradient_and_cam_methods_are_a_failed_precondition(
    method: str, remote: LoadedModel
) -> None:
    with pytest.raises(FailedPrecondition, match=f"method '{method}' needs the model's") as e:
        xai_serve.explain(remote.module, _images(1), method)
    assert "lime" in str(e.value) and "load the model locally" in str(e.value)
    assert isinstance(remote.not_offered(method), FailedPrecondition)
    assert isinstance(remote.not_offered("no_such_method"), NotFound)


def test_calls_are_pipelined(kserve: KServeProcess, scripted: Path, workdir: Path) -> None:
    """With in_flight = 4, eight calls to a model that takes 0.25 s each finish in about two
    rounds (the KServe server answers them concurrently); one at a time they take eight."""
    slow = KServeProcess(workdir, scripted, name="slow", delay_s=0.25)
    try:
        times = {}
        for in_flight in (1, 4):
            cfg = remote_config("p", slow.address, model="slow", max_batch=2, in_flight=in_flight)
            model = load_model(cfg)
            x = _images(16)
            start = time.perf_counter()
            model.module(x)
            times[in_flight] = time.perf_counter() - start
            assert model.remote is not None and model.remote.calls == 1 + 8  # probe + 8
            model.remote.close()
    finally:
        slow.close()
    assert times[1] >= 8 * 0.25
    assert times[4] < 0.5 * times[1], times


def test_chunks_are_drawn_at_most_in_flight_ahead(remote: LoadedModel) -> None:
    client = remote.remote
    assert client is not None
    drawn = []

    def chunks() -> Iterator[torch.Tensor]:
        for i in range(10):
            drawn.append(i)
            yield _images(2, seed=i)

    outputs = client.forward_chunks(chunks())
    first = next(outputs)
    assert len(drawn) == client.in_flight  # 4 calls out before the first answer is read
    rest = list(outputs)
    assert len(rest) == 9 and len(drawn) == 10
    torch.testing.assert_close(first, client(_images(2, seed=0)))


# --------------------------------------------------------------------------------------------
# Deadlines, cancellation, failures
# --------------------------------------------------------------------------------------------


def test_deadline_and_cancellation_reach_the_calls(scripted: Path, workdir: Path) -> None:
    slow = KServeProcess(workdir, scripted, name="cnn", delay_s=0.2)
    try:
        # each call takes 0.2 s; 20 calls of one image, 4 at a time, would take 1 s
        model = load_model(remote_config("s", slow.address, model="cnn", max_batch=1))
        assert model.remote is not None
        x = _images(20)
        start = time.monotonic()
        with (
            pytest.raises(DeadlineExceeded, match="deadline passed"),
            call_scope(deadline=time.monotonic() + 0.5),
        ):
            model.module(x)
        assert time.monotonic() - start < 1.5
        start = time.monotonic()
        with (
            pytest.raises(Cancelled, match="cancelled"),
            call_scope(cancelled=lambda: time.monotonic() > start + 0.3),
        ):
            model.module(x)
        assert time.monotonic() - start < 1.0
        model.remote.close()
    finally:
        slow.close()


def test_unreachable_and_stopped_servers_are_unavailable(scripted: Path, workdir: Path) -> None:
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1:\d+ is unavailable"):
        load_model(remote_config("down", f"127.0.0.1:{free_port()}", timeout_s=5))
    server = KServeProcess(workdir, scripted, name="cnn")
    model = load_model(remote_config("r", server.address, model="cnn"))
    server.close()
    with pytest.raises(Unavailable, match="is unavailable"):
        model.module(_images(2))


def test_unknown_remote_model_is_not_found(kserve: KServeProcess) -> None:
    with pytest.raises(NotFound, match="has no model 'nope'"):
        load_model(remote_config("r", kserve.address, model="nope"))


def test_config_that_does_not_fit_the_metadata_is_refused(kserve: KServeProcess) -> None:
    with pytest.raises(InvalidInput, match="has no input 'pixels'; its inputs: input"):
        load_model(remote_config("r", kserve.address, model="cnn", input="pixels"))
    with pytest.raises(InvalidInput, match=r"dtype is FP16 but .* takes FP32"):
        load_model(remote_config("r", kserve.address, model="cnn", dtype="FP16"))
    with pytest.raises(InvalidInput, match=r"takes input \[-1, 3, 32, 32\].*NHWC"):
        load_model(remote_config("r", kserve.address, model="cnn", layout="NHWC"))
    with pytest.raises(InvalidInput, match=r"num_classes is 7 but .* answers 5 scores"):
        cfg = remote_config("r", kserve.address, model="cnn")
        load_model(ModelConfig(**{**cfg.__dict__, "num_classes": 7}))


def test_token_env_must_be_set(kserve: KServeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XAI_TEST_REMOTE_TOKEN", raising=False)
    with pytest.raises(InvalidInput, match=r"\$XAI_TEST_REMOTE_TOKEN is unset"):
        load_model(
            remote_config("r", kserve.address, model="cnn", token_env="XAI_TEST_REMOTE_TOKEN")
        )
    monkeypatch.setenv("XAI_TEST_REMOTE_TOKEN", "abc")  # sent; the SDK server ignores it
    model = load_model(
        remote_config("r", kserve.address, model="cnn", token_env="XAI_TEST_REMOTE_TOKEN")
    )
    assert model.num_classes == CLASSES


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("shape", r"answered with shape \[10\]; expected one output of numeric scores \[2, "),
        ("bytes", r"answered with datatype 'BYTES'"),
        # the SDK answers INTERNAL "Internal server error" for the model's exception
        ("error", r"answered ModelInfer with INTERNAL: "),
    ],
)
def test_garbage_answers_are_unavailable_with_a_message(
    mode: str, message: str, scripted: Path, workdir: Path
) -> None:
    bad = KServeProcess(workdir, scripted, name="cnn", mode=mode)
    try:
        client = RemoteModel(RemoteConfig(url=bad.address, model="cnn"), "g", INPUT)
        with pytest.raises(Unavailable, match=message):
            client(_images(2))
        client.close()
        with pytest.raises(Unavailable, match="a probe call failed"):
            load_model(remote_config("g", bad.address, model="cnn"))
    finally:
        bad.close()


def test_a_changed_class_count_is_unavailable(remote: LoadedModel) -> None:
    client = remote.remote
    assert client is not None
    client.num_classes = 6  # as if the remote model were replaced by one with other classes
    try:
        with pytest.raises(Unavailable, match=r"answered with 5 classes \(it had 6\)"):
            remote.module(_images(2))
    finally:
        client.num_classes = CLASSES


def test_fp64_answers_are_converted(scripted: Path, workdir: Path, local: LoadedModel) -> None:
    server = KServeProcess(workdir, scripted, name="cnn", mode="fp64")
    try:
        model = load_model(remote_config("f", server.address, model="cnn"))
        x = _images(3)
        got = model.module(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, local.module(x), rtol=1e-5, atol=1e-6)
    finally:
        server.close()


def test_example_server_toml_shows_every_remote_key_with_its_default() -> None:
    """``examples/server.toml`` carries a commented oip model: uncommented it is a valid config
    whose remote table names every RemoteConfig key, at its default (the keys shown commented
    out have a None default: their lines say what None means)."""
    text = (Path(__file__).parents[2] / "examples" / "server.toml").read_text()
    start = text.index('# name = "remote_resnet50"') - len("# [[models]]\n")
    setting = re.compile(r"^# ((?:# )?[a-z_]+ = .*|\[.*\])$")  # keys, tables; not prose
    block = [line[2:] for line in text[start:].splitlines() if setting.match(line)]
    table = tomllib.loads("\n".join(block))["models"][0]
    cfg = model_config_from_dict(table)
    assert cfg.source == "oip" and cfg.remote is not None
    shown = set(re.findall(r"^#?\s*([a-z_]+) = ", "\n".join(block), flags=re.MULTILINE))
    assert set(_REMOTE_KEYS) <= shown, set(_REMOTE_KEYS) - shown
    defaults = RemoteConfig(url=cfg.remote.url)
    assert cfg.remote == defaults


class _Wrapped(BlackBoxModel):
    """A local model seen as a black box; ``flat`` makes it answer 1-D scores."""

    def __init__(self, inner: torch.nn.Module, flat: bool = False) -> None:
        super().__init__()
        self.inner, self.flat, self.chunks = inner, flat, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.chunks += 1
        out = self.inner(x)
        return out.flatten() if self.flat else out


@pytest.mark.parametrize("method", BLACK_BOX)
def test_any_black_box_model_gets_the_same_answer(method: str, local: LoadedModel) -> None:
    """The explainer side alone: the chunks go through BlackBoxModel.forward_chunks (one
    forward per chunk of batch_size) and the answer is the plain module's."""
    x = _images(2, seed=4)
    kw = {**({"seed": SEED} if method != "occlusion" else {}), **OPTIONS[method]}
    box = _Wrapped(local.module)
    got = xai_serve.explain(box, x, method, batch_size=16, **kw)
    want = xai_serve.explain(local.module, x, method, batch_size=16, **kw)
    torch.testing.assert_close(got.maps, want.maps)
    if method == "occlusion":  # the unperturbed forward, then 2 * windows inputs by 16
        assert got.samples is not None
        assert box.chunks == 1 + -(-2 * got.samples // 16)
    with pytest.raises(FailedPrecondition, match="but _Wrapped is served elsewhere"):
        xai_serve.explain(box, x, "saliency")
    with pytest.raises(InvalidInput, match=r"for N = 2 it returned \(10,\)"):
        xai_serve.explain(_Wrapped(local.module, flat=True), x, method, **kw)
