"""compress.gpulock: vLLM engines start alone on a GPU; stages, transformers engines and stopping
vLLM engines share it. Checked with the real lock files (POSIX locks need no GPU), probed from
another process: a process never waits on its own POSIX lock."""

import contextlib
import fcntl
import os
import threading

import pytest

from compress import gpulock


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(gpulock.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def free(gpu: str, mode: int) -> bool:
    """Whether another process could take `gpu`'s lock in `mode` now (asked from a forked child,
    which holds none of this process's locks; opening the file here would let them go)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fcntl.lockf(os.open(gpulock.lock_path(gpu), os.O_RDWR | os.O_CREAT), mode | fcntl.LOCK_NB)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def hold_in_thread(mode: int):
    """(thread, holds): a thread taking a gpulock.Hold on "cuda" in `mode` into `holds`; in a
    thread so that a hold that waits forever fails the test instead of hanging it."""
    holds = []
    took = threading.Thread(target=lambda: holds.append(gpulock.Hold("cuda", mode)), daemon=True)
    took.start()
    return took, holds


def test_exclusive_keeps_everyone_out_and_shared_keeps_starts_out():
    with gpulock.exclusive("cuda"):
        assert not free("0", fcntl.LOCK_SH) and not free("0", fcntl.LOCK_EX)
    assert free("0", fcntl.LOCK_EX)
    with gpulock.shared("cuda"):
        assert free("0", fcntl.LOCK_SH) and not free("0", fcntl.LOCK_EX)
    assert free("0", fcntl.LOCK_EX)


def test_nested_in_one_process_converts_instead_of_waiting_on_itself():
    with gpulock.shared("cuda"):
        with gpulock.exclusive("cuda"):  # would wait forever on its own shared lock if it did not convert
            assert not free("0", fcntl.LOCK_SH)
        assert free("0", fcntl.LOCK_SH) and not free("0", fcntl.LOCK_EX)  # back to shared
    assert free("0", fcntl.LOCK_EX) and gpulock._HELD == {}


def test_a_forked_child_does_not_keep_the_lock():
    """vLLM forks its engine core while its start holds the lock exclusively, and the engine core
    lives on. The lock goes when the start ends all the same: others may take it, and so may this
    process again (with flock the child's copy kept it, and the next hold here waited forever)."""
    r, w = os.pipe()
    with gpulock.exclusive("cuda"):
        pid = os.fork()
        if pid == 0:  # the engine core: alive until the pipe closes
            os.close(w)
            os.read(r, 1)
            os._exit(0)
    try:
        assert free("0", fcntl.LOCK_EX)
        took, holds = hold_in_thread(gpulock.SHARED)
        took.join(20)
        assert not took.is_alive(), "this process waited on the lock its forked child kept"
        assert free("0", fcntl.LOCK_SH) and not free("0", fcntl.LOCK_EX)
        holds[0].release()
        assert free("0", fcntl.LOCK_EX)
    finally:
        os.close(w)
        os.waitpid(pid, 0)
        os.close(r)


def test_a_wait_for_another_process_is_said_on_stderr(capfd):
    """Taking the lock while another process holds it says so before waiting; the wait ends when
    that process lets go. Not said when nothing stands in the way."""
    with gpulock.shared("cuda"):
        pass
    assert "waiting" not in capfd.readouterr().err
    go, ready = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # another process holding the GPU exclusively until told to go
        with gpulock.exclusive("cuda"):
            os.write(ready[1], b"x")
            os.read(go[0], 1)
        os._exit(0)
    os.read(ready[0], 1)
    took, holds = hold_in_thread(gpulock.SHARED)
    took.join(1)
    assert took.is_alive() and not holds  # waiting
    os.write(go[1], b"x")
    os.waitpid(pid, 0)
    took.join(20)
    assert holds and "GPU 0: waiting for another process's hold on it" in capfd.readouterr().err
    holds[0].release()
    for fd in (*go, *ready):
        os.close(fd)


def test_two_processes_holding_it_shared_both_get_it_exclusively():
    """Each holds the GPU shared (a chain of stages) and then wants it exclusively (a vLLM engine
    started inside): one waits for the other instead of both waiting on each other."""
    go, ready = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with gpulock.shared("cuda"):
                os.write(ready[1], b"x")
                os.read(go[0], 1)
                with gpulock.exclusive("cuda"):
                    code = 0
        finally:
            os._exit(code)
    with gpulock.shared("cuda"):
        os.read(ready[0], 1)
        took, holds = hold_in_thread(gpulock.EXCLUSIVE)
        took.join(1)
        assert took.is_alive()  # waiting for the other's shared hold
        os.write(go[1], b"x")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        took.join(20)
        assert holds and not free("0", fcntl.LOCK_SH)
        holds[0].release()
        assert free("0", fcntl.LOCK_SH) and not free("0", fcntl.LOCK_EX)  # back to the shared hold
    assert free("0", fcntl.LOCK_EX) and gpulock._HELD == {}
    for fd in (*go, *ready):
        os.close(fd)


def test_the_lock_is_per_physical_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # as Ray sets it for a task
    assert gpulock.gpu_ids("cuda") == ["3"] and gpulock.gpu_ids("cuda:1") == ["5"]
    assert gpulock.gpu_ids("cuda", world=2) == ["3", "5"]
    with gpulock.exclusive("cuda:1"):
        assert free("3", fcntl.LOCK_EX) and not free("5", fcntl.LOCK_SH)
    with gpulock.exclusive("cuda", world=2):
        assert not free("3", fcntl.LOCK_SH) and not free("5", fcntl.LOCK_SH)


def test_cpu_takes_no_lock(lock_dir):
    with gpulock.exclusive("cpu"), gpulock.shared("cpu"):
        assert list(lock_dir.iterdir()) == []


def seen_at_start(monkeypatch, model, probe, **kw) -> dict:
    """What `probe(llm_kwargs)` saw while VLLMEngine.load on a GPU constructed vllm.LLM (a fake that
    stops the start there)."""
    vllm = pytest.importorskip("vllm")
    from eval.engines.vllm import VLLMEngine

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(**llm_kw):
        seen.update(probe(llm_kw))
        raise Stop

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(Stop):
        VLLMEngine.load(model, device="cuda", **kw)
    return seen


def test_vllm_engine_starts_under_the_exclusive_lock(monkeypatch, tiny_model):
    """VLLMEngine.load on a GPU constructs vllm.LLM holding every GPU of its world exclusively."""
    seen = seen_at_start(monkeypatch, tiny_model, lambda kw: {"locked": [not free(g, fcntl.LOCK_SH)
                                                                       for g in ("0", "1", "2")]},
                         tensor_parallel_size=2)
    assert seen["locked"] == [True, True, False]
    assert free("0", fcntl.LOCK_EX) and free("1", fcntl.LOCK_EX)  # let go when the start failed


def test_a_vllm_engine_with_a_fixed_kv_cache_starts_beside_others(monkeypatch, tiny_model):
    """kv_cache_memory_bytes: vLLM does not size its cache from free memory, so the start holds the
    GPU shared (others may start beside it) but still keeps out what needs it alone."""
    seen = seen_at_start(monkeypatch, tiny_model, lambda kw: {
        "kv": kw.get("kv_cache_memory_bytes"), "shared_free": free("0", fcntl.LOCK_SH),
        "exclusive_free": free("0", fcntl.LOCK_EX)}, kv_cache_memory_bytes=1 << 31)
    assert seen == {"kv": 1 << 31, "shared_free": True, "exclusive_free": False}
    assert free("0", fcntl.LOCK_EX)


def test_vllm_engine_stops_under_the_shared_lock():
    """Stopping frees memory: not while another engine starts (exclusive), but beside stages."""
    from types import SimpleNamespace

    from eval.engines.vllm import VLLMEngine

    seen = {}

    def shutdown(timeout):
        seen["state"] = (free("0", fcntl.LOCK_SH), free("0", fcntl.LOCK_EX))

    eng = VLLMEngine.__new__(VLLMEngine)
    eng.device, eng.world = "cuda", 1
    eng.llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=shutdown)))
    eng.close()
    assert seen["state"] == (True, False) and eng.llm is None
    assert free("0", fcntl.LOCK_EX)


def test_stages_run_under_the_shared_lock(monkeypatch, tiny_model, text_file, tmp_path):
    """A chain's stage is applied inside gpulock.shared(device)."""
    from compress import registry
    from squeeze.pipeline import chain
    from squeeze.recipe import parse_recipe
    from tests.conftest import tiny_recipe

    events, real_get = [], registry.get

    @contextlib.contextmanager
    def shared(device, world=1):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    class Watched:
        def __init__(self, stage):
            self.stage = stage

        def __getattr__(self, k):
            return getattr(self.stage, k)

        def apply(self, model, cfg, ctx):
            events.append(("apply", None))
            return self.stage.apply(model, cfg, ctx)

    monkeypatch.setattr(chain.gpulock, "shared", shared)
    monkeypatch.setattr(chain.registry, "get", lambda t: Watched(real_get(t)))
    recipe = parse_recipe(tiny_recipe(tiny_model, text_file))
    chain.run_chain(recipe, recipe.stages, [tmp_path / "stages" / "s1"], "cpu", tiny_model)
    assert events == [("enter", "cpu"), ("apply", None), ("exit", "cpu")]
