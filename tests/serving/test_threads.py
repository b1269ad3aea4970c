"""Only the device workers run torch with many intra-op threads: the event loop and the decode
pool run theirs with one, so their OpenMP teams do not take cores from the model (on 2 cores a
batch-1 Grad-CAM took twice as long with them)."""

from __future__ import annotations

import pytest
import torch

from tests._peers import require
from tests.serving.harness import ServerThread, tiny_model
from xai_serve.serving.batcher import _PER_THREAD_THREADS

pytestmark = pytest.mark.skipif(
    not _PER_THREAD_THREADS, reason="ATen's parallel backend is not OpenMP (one global count)"
)


async def _loop_threads() -> int:
    return torch.get_num_threads()


def test_thread_counts_per_role() -> None:
    before = torch.get_num_threads()
    with ServerThread(models=[tiny_model()]) as s:
        assert s.server is not None
        state = s.server.state
        worker = state.workers.get("cpu").submit(torch.get_num_threads).result()
        decode = state.cpu_pool.submit(torch.get_num_threads).result()
        loop = s.call(_loop_threads())
    assert (worker, decode, loop) == (state.workers.threads, 1, 1)
    assert state.workers.threads == before  # the process's count, taken when it was built
    assert torch.get_num_threads() == before  # this thread is untouched


_SCRIPT = """
import sys, time, torch, xai_serve
from concurrent.futures import ThreadPoolExecutor
from xai_serve.models import bundled_model_config, load_model
from xai_serve.serving.batcher import DeviceWorkers, set_torch_threads

others = int(sys.argv[1])  # the intra-op threads of the other threads
worker = DeviceWorkers().get("cpu")  # as the server's: the process's count
decode = ThreadPoolExecutor(1, initializer=set_torch_threads, initargs=(others,))
model = worker.submit(load_model, bundled_model_config()).result()
x = torch.randn(1, *model.input_shape)

def timed():
    xai_serve.explain(model.module, x, "gradcam")
    start = time.perf_counter()
    for _ in range(10):
        xai_serve.explain(model.module, x, "gradcam")
    return time.perf_counter() - start

def small_ops():  # what the loop and the decode pool do per request
    y = torch.randn(3, 224, 224)
    bool(torch.isfinite(y).all()); y.amin(); y.amax()
    torch.nn.functional.interpolate(y[None], size=(112, 112), mode="bilinear", antialias=True)

alone = min(worker.submit(timed).result() for _ in range(2))
set_torch_threads(others)  # this thread plays the event loop
small_ops()
decode.submit(small_ops).result()
after = min(worker.submit(timed).result() for _ in range(2))
print(after / alone)
"""


def _slowdown(others: int) -> float:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(others)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2+ intra-op threads")
def test_other_threads_at_one_thread_leave_the_worker_its_speed() -> None:
    """The mechanism, measured in a fresh process (this one's threads already ran torch): the
    worker's batch-1 Grad-CAM before and after the loop and decode threads ran their small
    parallel ops at one thread must keep its speed (at the full count it took ~2x on 2
    cores)."""
    require("efficientnet_lite_pytorch")
    assert _slowdown(1) < 1.35
