"""What the server may touch: with ``model_dirs`` set, no model file outside them is ever
opened — whatever the path's trick (absolute, ``..``, a symlinked file or folder, a symlink
swapped after the config was read, a class-names file) and whatever the loader (torchvision
state dict, TorchScript, ``torch.export``, all of which open files in C++ too). Watched with
inotify, which sees every open of a file in a folder, by any code in any process; the
controls show that it does see the server's opens when a path is allowed. Paths that cannot
be resolved at all (a symlink loop, a NUL byte, an unknown user's ``~``) are refused as
InvalidInput naming the key.

And TLS: a TLS port refuses plaintext gRPC, junk and HTTP/2 in the clear, keeps serving TLS
clients, and holds no descriptor of the refused connections.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.reliability.harness import RESNET, SCRIPTED, SmallCNN, record, write_models
from tests.serving.certs import have_openssl, make_certs
from tests.serving.harness import ServerThread
from xai_serve.errors import InvalidInput
from xai_serve.models import ModelConfig, TransformConfig
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving.config import ServerConfig, TlsConfig

IN_ACCESS, IN_OPEN = 0x001, 0x020
_EVENT = struct.Struct("iIII")


class Inotify:
    """Open (and read) events on the files of the watched folders, from ``inotify(7)``."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable: errno {ctypes.get_errno()}")
        self._dirs: dict[int, Path] = {}

    def watch(self, folder: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN | IN_ACCESS)
        assert wd >= 0, ctypes.get_errno()
        self._dirs[wd] = folder

    def events(self) -> list[tuple[Path, int]]:
        """``(file, mask)`` of every event since the last call (files only, not the folder)."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if name:
                    out.append((self._dirs[wd] / name.decode(), mask))

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture()
def layout(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, Path], Inotify]]:
    """``(allowed, outside, files outside, watcher on outside)``."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    files = write_models(outside)  # outside/models/...
    folder = outside / "models"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(
            SmallCNN().eval(),
            (torch.zeros(2, 3, 48, 48),),
            dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},),
        )
        torch.export.save(ep, str(folder / "small_cnn.pt2"))
    files["export"] = folder / "small_cnn.pt2"
    names = folder / "classes.txt"
    names.write_text("".join(f"class {i}\n" for i in range(10)))
    files["names"] = names
    for kind in LOADERS:  # copies inside, made before the watch begins
        shutil.copy(files[kind], allowed / files[kind].name)
    watcher = Inotify()
    watcher.watch(folder)
    yield allowed, folder, files, watcher
    watcher.close()


def _model(kind: str, path: Path | str, **kw: object) -> ModelConfig:
    if kind == RESNET:
        return ModelConfig(
            name="m",
            source="torchvision",
            arch="resnet18",
            num_classes=10,
            path=str(path),
            transform=TransformConfig(resize=64, crop=(64, 64)),
            **kw,  # type: ignore[arg-type]
        )
    return ModelConfig(
        name="m",
        source="torchscript" if kind == SCRIPTED else "export",
        num_classes=6,
        path=str(path),
        transform=TransformConfig(resize=48, crop=(48, 48)),
        **kw,  # type: ignore[arg-type]
    )


def _config(model: ModelConfig, dirs: list[Path]) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=False,
        models=(model,),
        model_dirs=tuple(str(d) for d in dirs),
    )


def _trick(how: str, allowed: Path, target: Path) -> Path | str:
    if how == "absolute":
        return target
    if how == "dotdot":
        return f"{allowed}/../outside/models/{target.name}"
    if how == "deep-dotdot":  # through folders that do not exist
        return f"{allowed}/{'x/../' * 5}../outside/models/{target.name}"
    if how == "symlink-file":
        link = allowed / f"link-{target.name}"
        link.symlink_to(target)
        return link
    if how == "symlink-dir":
        sub = allowed / "sub"
        if not sub.exists():
            sub.symlink_to(target.parent, target_is_directory=True)
        return sub / target.name
    raise AssertionError(how)


TRICKS = ["absolute", "dotdot", "deep-dotdot", "symlink-file", "symlink-dir"]
LOADERS = [RESNET, SCRIPTED, "export"]


@pytest.mark.parametrize("kind", LOADERS)
def test_model_files_outside_model_dirs_are_never_opened(
    layout: tuple[Path, Path, dict[str, Path], Inotify], kind: str
) -> None:
    allowed, outside, files, watcher = layout
    refused = 0
    for how in TRICKS:
        path = _trick(how, allowed, files[kind])
        with pytest.raises(InvalidInput, match="not inside any of model_dirs"):
            _config(_model(kind, path), [allowed])
        refused += 1
    # a class-names file outside, for a model whose weights are inside: refused at load
    inside = allowed / files[kind].name
    if kind == RESNET:
        cfg = _config(_model(kind, inside, class_names=str(files["names"])), [allowed])
        with ServerThread(config=cfg) as s:
            assert s.server is not None
            assert "outside the allowed model directories" in s.server.state.failed["m"]
        refused += 1
    # a symlink inside that points inside when the config is read, outside when it loads
    link = allowed / "swapped"
    link.symlink_to(inside)
    cfg = _config(_model(kind, link), [allowed])
    link.unlink()
    link.symlink_to(files[kind])
    with ServerThread(config=cfg) as s:
        assert s.server is not None
        assert "outside the allowed model directories" in s.server.state.failed["m"]
        with grpc.insecure_channel(s.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ExplainerStub(channel).Explain(
                    pb.ExplainRequest(model="m", method="saliency"), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    refused += 1
    assert watcher.events() == [], "a file outside model_dirs was opened"

    # controls: with the folder allowed the same loader opens the same file, and inotify sees it
    cfg = _config(_model(kind, files[kind]), [allowed, outside])
    with ServerThread(config=cfg) as s:
        assert s.server is not None and s.server.state.failed == {}
    opened = {p for p, mask in watcher.events() if mask & IN_OPEN}
    assert files[kind] in opened, opened
    record(f"confinement_{kind}", refused_paths=refused, opened_outside=0)


@pytest.mark.parametrize("how", ["loop", "nul", "unknown-user"])
def test_unresolvable_paths_are_invalid_input(tmp_path: Path, how: str) -> None:
    loop = tmp_path / "a"
    loop.symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(loop)
    path = {"loop": str(loop), "nul": f"{tmp_path}/x\0y", "unknown-user": "~no-such-user-x/m.pt"}
    with pytest.raises(InvalidInput, match=r"models\['m'\]\.path .* cannot be resolved"):
        _config(_model(RESNET, path[how]), [tmp_path])
    with pytest.raises(InvalidInput, match=r"model_dirs\[0\] .* cannot be resolved"):
        _config(_model(RESNET, tmp_path / "m.pt"), [Path(path[how])])


# --------------------------------------------------------------------------------------------
# TLS refuses what is not TLS
# --------------------------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fds(at_most: int | None = None, timeout: float = 10.0) -> int:
    """This process's open descriptors once closed connections are gone: the count after it
    stayed the same for half a second (or fell to ``at_most``)."""
    deadline = time.monotonic() + timeout
    last, same = _open_fds(), 0
    while same < 10 and time.monotonic() < deadline:
        if at_most is not None and last <= at_most:
            return last
        time.sleep(0.05)
        now = _open_fds()
        same = same + 1 if now == last else 0
        last = now
    return last


@needs_openssl
def test_tls_port_refuses_plaintext_and_junk(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    write_models(tmp_path)
    tls = TlsConfig(cert=str(certs["server_cert"]), key=str(certs["server_key"]))
    model = _model(RESNET, tmp_path / "models/resnet18.pt")
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, models=(model,), tls=tls)
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca"].read_bytes())
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    req = pb.ExplainRequest(model="m", method="gradcam", target=3)
    req.tensor.shape.extend([3, 64, 64])
    req.tensor.dtype = pb.FLOAT32
    req.tensor.data = x.numpy().astype("<f4").tobytes()
    with ServerThread(config=cfg) as s:
        assert s.server is not None
        port = s.server.port
        with grpc.secure_channel(s.address, creds) as channel:
            first = pb_grpc.ExplainerStub(channel).Explain(req, timeout=30)
        before = _settled_fds()
        refused = 0
        for _ in range(3):
            with grpc.insecure_channel(s.address) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.ExplainerStub(channel).Explain(req, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                refused += 1
        payloads = [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            os.urandom(2048),
            b"\x16\x03\x01\x00\x05junk",  # a TLS record header, then nonsense
        ]
        for payload in payloads * 3:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(payload)
                sock.settimeout(0.5)  # a TLS server waits for a ClientHello that never comes
                try:
                    answer = sock.recv(4096)
                except (TimeoutError, ConnectionError):
                    answer = b""
                assert not answer.startswith(b"HTTP/") and b"xai_serve" not in answer
            refused += 1
        with grpc.secure_channel(s.address, creds) as channel:  # TLS clients: still served
            again = pb_grpc.ExplainerStub(channel).Explain(req, timeout=30)
        assert again.map.data == first.map.data and again.target == first.target == 3
        # server and clients run in this process: no descriptor of those connections is kept
        assert _settled_fds(at_most=before) <= before
    record("tls_refusals", refused_connections=refused)
