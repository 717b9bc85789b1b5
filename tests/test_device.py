"""The kNN layer's device path: no host synchronisation on the model's thread, device copies
waited for on the memory's thread, and (when CUDA is present) results on the device equal to the
CPU path's with ``torch.cuda.set_sync_debug_mode("error")`` around a forward.

On CPU the layer takes the same path as on CUDA minus pinning and events, so the CPU tests below
catch a host sync added to the hot path even on a machine without a GPU: they make every call
that waits for the GPU on CUDA (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool(tensor)``, a
``.to`` the host, ...) raise when the model's thread makes it inside the kNN layer's forward or
in the backward.
"""

import threading
from contextlib import contextmanager

import pytest
import torch

from memtrans import MemorizingTransformer
from memtrans import memory as memory_module
from memtrans import transfer
from memtrans.model import KNNAttention

SMALL = dict(num_tokens=64, dim=32, dim_head=8, heads=2, depth=3, memorizing_layers=(2, 3),
             max_knn_memories=64, num_retrieved_memories=4, xl_max_memories=8)
SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "unique", "masked_select", "__bool__",
         "__int__", "__float__", "__index__", "__array__")
"""Tensor methods that, on a CUDA tensor, make the host wait for the GPU stream (``nonzero``,
``unique`` and ``masked_select`` to size their result from the data)."""
SYNC_FUNCTIONS = ("nonzero", "unique", "masked_select")
"""The same as ``torch.`` functions."""

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.is_available() is False (no GPU here, or a CPU-only "
           "torch build); these tests have never run on a GPU")


def _is_host(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


class SyncGuard:
    """Records (and raises on) host syncs that the model's thread makes while ``armed``."""

    def __init__(self):
        self.model_thread = threading.current_thread()
        self.armed = 0
        self.calls: list[str] = []

    def check(self, what: str) -> None:
        if self.armed and threading.current_thread() is self.model_thread:
            self.calls.append(what)
            raise AssertionError(f"{what} on the model's thread in the kNN layer's hot path: on "
                                 f"CUDA it waits for the GPU stream")

    @contextmanager
    def arm(self):
        self.armed += 1
        try:
            yield
        finally:
            self.armed -= 1

    def install(self, monkeypatch) -> None:
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def guarded(tensor, *args, name=name, original=original, **kwargs):
                self.check(f"Tensor.{name}()")
                return original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, guarded)
        for name in SYNC_FUNCTIONS:
            original = getattr(torch, name)

            def guarded_function(*args, name=name, original=original, **kwargs):
                self.check(f"torch.{name}()")
                return original(*args, **kwargs)

            monkeypatch.setattr(torch, name, guarded_function)
        to = torch.Tensor.to

        def guarded_to(tensor, *args, **kwargs):
            if any(_is_host(a) for a in (*args, kwargs.get("device"))):
                self.check("Tensor.to(a CPU device)")
            return to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", guarded_to)
        for name in ("begin", "finish"):
            original = getattr(KNNAttention, name)

            def armed(layer, *args, original=original, **kwargs):
                with self.arm():
                    return original(layer, *args, **kwargs)

            monkeypatch.setattr(KNNAttention, name, armed)


def _train_steps(model, memories, guard, *, micro_batches=1, steps=3):
    """Forward and backward of a few segments, XL rows marked stale and partly valid (so the
    stale-XL masking and the per-row adds run), with the guard armed in the layer's forward and
    over every backward."""
    torch.manual_seed(1)
    xl = None
    for step in range(steps):
        x = torch.randint(1, 64, (2, 16))
        valid = torch.tensor([True, step != 1]) if step < 2 else torch.tensor([8, 3])
        loss, xl = model(x, knn_memories=memories, xl_memories=xl, labels=x, xl_valid=valid,
                         micro_batches=micro_batches)
        with guard.arm():
            loss.backward()
        memories.collect_adds()
    return loss


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("combine", ["joint", "gate"])
def test_in_process_layer_makes_no_host_sync(monkeypatch, micro_batches, combine):
    torch.manual_seed(0)
    model = MemorizingTransformer(**SMALL, knn_combine=combine)
    guard = SyncGuard()
    guard.install(monkeypatch)
    with model.knn_memories_context(batch_size=2) as memories:
        loss = _train_steps(model, memories, guard, micro_batches=micro_batches)
        assert memories.backend.store.stats()["entries"] > 0
    assert torch.isfinite(loss) and guard.calls == []


def test_remote_layer_makes_no_host_sync(monkeypatch, memory_server):
    servers = memory_server(2)
    torch.manual_seed(0)
    model = MemorizingTransformer(**SMALL)
    guard = SyncGuard()
    guard.install(monkeypatch)
    with model.knn_memories_context(batch_size=2, servers=[s.endpoint for s in servers],
                                    timeout=20) as memories:
        loss = _train_steps(model, memories, guard, micro_batches=2)
    assert torch.isfinite(loss) and guard.calls == []


def test_the_guard_catches_a_host_sync_in_the_layer(monkeypatch):
    """The guard is live: one ``.item()`` in the layer's forward fails the step."""
    model = MemorizingTransformer(**SMALL)
    finish = KNNAttention.finish

    def finish_with_sync(layer, state):
        state["scale"].sum().item()
        return finish(layer, state)

    monkeypatch.setattr(KNNAttention, "finish", finish_with_sync)
    guard = SyncGuard()
    guard.install(monkeypatch)
    with model.knn_memories_context(batch_size=2) as memories:
        with pytest.raises(AssertionError, match=r"Tensor.item\(\) on the model's thread"):
            _train_steps(model, memories, guard, steps=1)


class RecordingEvent:
    """Stands in for the CUDA event of a device-to-host copy: records who waits for it."""

    def __init__(self, waits: list):
        self.waits = waits

    def synchronize(self) -> None:
        self.waits.append(threading.current_thread())


@pytest.mark.parametrize("remote", [False, True])
def test_device_copies_are_waited_for_on_the_memory_thread(monkeypatch, memory_server, remote):
    """Every query and key/value copy is waited for, and never on the model's thread."""
    waits = []
    to_host = transfer.to_host

    def to_host_with_event(tensor, *args, **kwargs):
        return transfer.HostCopy(to_host(tensor, *args, **kwargs).tensor, RecordingEvent(waits))

    monkeypatch.setattr(memory_module, "to_host", to_host_with_event)
    servers = [s.endpoint for s in memory_server(1)] if remote else None
    torch.manual_seed(0)
    model = MemorizingTransformer(**SMALL)
    with model.knn_memories_context(batch_size=2, servers=servers, timeout=20) as memories:
        for _ in range(3):
            with torch.no_grad():
                model(torch.randint(1, 64, (2, 16)), knn_memories=memories)
            memories.collect_adds()
    # Per step and memorizing layer: one search, one add (what left the 8-entry XL window).
    assert len(waits) == 3 * 2 * 2
    assert all(t is not threading.main_thread() and t.name.startswith("knn-memory")
               for t in waits), {t.name for t in waits}


def test_host_copies_are_the_tensor_itself_on_cpu():
    t = torch.randn(2, 3, 4)
    copy = transfer.to_host(t)
    assert copy.event is None and copy.tensor.data_ptr() == t.data_ptr()
    assert copy.numpy().ctypes.data == t.data_ptr()
    assert transfer.to_device(t, t.device) is t
    assert transfer.pin_for(t, torch.device("cpu")) is t


def test_device_bookkeeping_and_devices_the_memory_cannot_take_are_refused():
    model = MemorizingTransformer(**SMALL)
    with model.knn_memories_context(batch_size=2) as memories:
        on_device = torch.tensor([True, False], device="meta")
        with pytest.raises(ValueError, match=r"xl_valid is host bookkeeping.*not a tensor on meta"):
            model(torch.randint(1, 64, (2, 16)), knn_memories=memories, xl_valid=on_device)
    with pytest.raises(ValueError, match=r"CPU or a CUDA device, got one on meta"):
        transfer.to_host(torch.empty(2, 3, device="meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: nothing to refuse")
def test_bench_step_on_cuda_says_cuda_is_missing(capsys):
    from bench import step

    with pytest.raises(SystemExit) as exit_:
        step.main(["--device", "cuda", "--quick"])
    assert exit_.value.code == 2
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# CUDA (skipped without a GPU; never run on this project's machine)


def _models(**overrides):
    torch.manual_seed(0)
    cpu = MemorizingTransformer(**{**SMALL, **overrides}).eval()
    gpu = MemorizingTransformer(**{**SMALL, **overrides}).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


@needs_cuda
@pytest.mark.parametrize("remote", [False, True])
def test_cuda_results_equal_the_cpu_path_and_stay_on_the_device(memory_server, remote):
    """The same model on CUDA and on the CPU computes the same logits, and one memory searched
    with the same queries from the CPU and from CUDA retrieves the same, on the queries' device."""
    cpu, gpu = _models()
    endpoints = [s.endpoint for s in memory_server(2)] if remote else None
    with cpu.knn_memories_context(batch_size=2, servers=endpoints, timeout=20) as on_cpu, \
            gpu.knn_memories_context(batch_size=2, servers=endpoints, timeout=20) as on_gpu:
        xl_cpu = xl_gpu = None
        with torch.no_grad():
            for step in range(4):
                x = torch.randint(1, 64, (2, 16))
                valid = torch.tensor([True, step != 2])
                a, xl_cpu = cpu(x, knn_memories=on_cpu, xl_memories=xl_cpu, xl_valid=valid)
                b, xl_gpu = gpu(x.cuda(), knn_memories=on_gpu, xl_memories=xl_gpu,
                                xl_valid=valid, micro_batches=2)
                assert b.device.type == "cuda" and all(m.device.type == "cuda" for m in xl_gpu)
                torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
        queries = torch.nn.functional.normalize(torch.randn(2, 2, 16, 8), dim=-1)
        memory = on_gpu[0]
        want = memory.retrieved(memory.search_async(queries, 4))
        got = memory.retrieved(memory.search_async(queries.cuda(), 4))
        kv, mask = memory.search(queries.cuda(), 4)
    assert kv.device.type == mask.device.type == "cuda"
    for name in ("keys", "values", "positions"):
        tensor = getattr(got, name)
        assert tensor.device.type == "cuda" and getattr(want, name).device.type == "cpu", name
        assert torch.equal(tensor.cpu(), getattr(want, name)), name


@needs_cuda
@pytest.mark.parametrize("remote", [False, True])
def test_cuda_forward_makes_no_synchronising_call(memory_server, remote):
    _, gpu = _models()
    endpoints = [s.endpoint for s in memory_server(1)] if remote else None
    with gpu.knn_memories_context(batch_size=2, servers=endpoints, timeout=20) as memories:
        xl = None
        for step in range(3):
            x = torch.randint(1, 64, (2, 16), device="cuda")
            valid = torch.tensor([True, step != 1])
            torch.cuda.set_sync_debug_mode("error" if step else "default")  # step 0 warms up
            try:
                loss, xl = gpu(x, knn_memories=memories, xl_memories=xl, labels=x,
                               xl_valid=valid, micro_batches=2)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            loss.backward()
            memories.collect_adds()
