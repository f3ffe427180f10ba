"""The decode attention kernel (assistant/decode_attention.cpp): one token's attention over the filled part
of a static cache equals SDPA's in fp32 for the head shapes it takes, whatever the thread count (it splits
positions over threads), refuses what it does not take with a clear error, and where it cannot be built
the decode steps keep SDPA."""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from assistant.cpu import decode_attention
from assistant.cpu.attention import grouped_decode_sdpa


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert decode_attention.load(), decode_attention.error  # CI has a compiler and ninja: it must build


def reference(query, key, value, length):
    return F.scaled_dot_product_attention(query.float(), key[:, :, :length].float(), value[:, :, :length].float(),
                                          scale=query.shape[-1] ** -0.5, enable_gqa=True)


@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("kv_heads,groups", [(1, 1), (3, 3), (2, 4), (1, 8)])
def test_matches_sdpa(dim, kv_heads, groups):
    torch.manual_seed(dim + groups)
    key = torch.randn(2, kv_heads, 300, dim, dtype=torch.bfloat16) * 2  # peaked softmaxes as well as flat ones
    value = torch.randn(2, kv_heads, 300, dim, dtype=torch.bfloat16)
    for length in (1, 15, 16, 17, 33, 64, 100, 257, 300):
        query = torch.randn(2, kv_heads * groups, 1, dim, dtype=torch.bfloat16)
        ours = decode_attention.decode_attention(query, key, value, length, dim ** -0.5)
        assert ours.shape == query.shape and ours.dtype == torch.bfloat16
        # bf16 output: within one rounding step of values of size about 1
        assert torch.allclose(ours.float(), reference(query, key, value, length), atol=1.6e-2, rtol=1e-2), length


def test_the_answer_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    query = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    key, value = (torch.randn(1, 3, 1024, 64, dtype=torch.bfloat16) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        answers = []
        for n in (1, 2, 4):  # one span a head, two, three: the partial softmaxes recombine exactly
            torch.set_num_threads(n)
            answers.append(decode_attention.decode_attention(query, key, value, 1000, 0.125).float())
    finally:
        torch.set_num_threads(threads)
    for other in answers[1:]:
        assert torch.allclose(answers[0], other, atol=8e-3)
    assert torch.allclose(answers[0], reference(query, key, value, 1000), atol=1.6e-2)


def test_reads_the_cache_through_its_strides():
    torch.manual_seed(1)  # a cache view whose heads are not adjacent in memory (a slice of a larger buffer)
    buffer = torch.randn(1, 6, 200, 32, dtype=torch.bfloat16)
    key, value = buffer[:, 0::2], buffer[:, 1::2]
    query = torch.randn(1, 6, 1, 32, dtype=torch.bfloat16)
    ours = decode_attention.decode_attention(query, key, value, 150, 32 ** -0.5)
    assert torch.allclose(ours.float(), reference(query, key, value, 150), atol=1.6e-2)


@pytest.mark.parametrize("change,message", [
    (dict(length=0), "valid_length 0 outside 1..40"),
    (dict(length=41), "valid_length 41 outside 1..40"),
    (dict(dtype=torch.float32), "bfloat16"),
    (dict(dim=48), "head dim 16, 32, 64 or 128"),
    (dict(query_heads=5), "not a multiple"),
    (dict(query_heads=18), "1 to 8 query heads per key/value head"),
])
def test_refuses_what_it_does_not_take(change, message):
    spec = dict(length=10, dtype=torch.bfloat16, dim=32, query_heads=4) | change
    query = torch.randn(1, spec["query_heads"], 1, spec["dim"], dtype=spec["dtype"])
    key = torch.randn(1, 2, 40, spec["dim"], dtype=spec["dtype"])
    with pytest.raises(RuntimeError, match=message):
        decode_attention.decode_attention(query, key, key, spec["length"], 0.1)


def test_decode_steps_use_the_kernel_where_it_takes_the_shapes_and_sdpa_elsewhere(monkeypatch):
    torch.manual_seed(2)
    module = types.SimpleNamespace(num_key_value_groups=3, head_dim=64, scaling=0.125)
    query = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    key, value = (torch.randn(1, 3, 64, 64, dtype=torch.bfloat16) for _ in range(2))
    assert decode_attention.supports(module)
    assert not decode_attention.supports(module, torch.float32)  # bf16 caches only
    with_kernel, _ = grouped_decode_sdpa(module, query, key, value, None, valid_length=40)
    monkeypatch.setattr(decode_attention, "_loaded", False)  # as where it could not be built
    assert not decode_attention.supports(module)
    with_sdpa, _ = grouped_decode_sdpa(module, query, key, value, None, valid_length=40)
    assert with_kernel.shape == with_sdpa.shape == (1, 1, 9, 64)
    assert torch.allclose(with_kernel.float(), with_sdpa.float(), atol=1.6e-2)
    assert not decode_attention.supports(types.SimpleNamespace(num_key_value_groups=3, head_dim=48))


def test_a_kernel_that_cannot_be_built_leaves_sdpa_with_a_warning(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(decode_attention, "_loaded", None)
    monkeypatch.setattr(decode_attention, "error", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_attention.load() is False
    assert "Ninja is required" in decode_attention.error
    assert any("decode steps use SDPA" in str(w.message) for w in caught)


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = decode_attention.build_directory("kernel")
    assert directory.parent == tmp_path and torch.__version__ in directory.name  # one build per torch version
    lock = directory / "lock"
    lock.touch()  # a build in progress (another process): left alone
    assert decode_attention.build_directory("kernel") == directory and lock.exists()
    old = time.time() - decode_attention.STALE_LOCK_SECONDS - 60  # a process killed while building
    os.utime(lock, (old, old))
    decode_attention.build_directory("kernel")
    assert not lock.exists()


def test_the_pip_ninja_is_found_without_an_activated_environment(monkeypatch):
    import shutil

    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    decode_attention._put_ninja_on_path()  # as load() does before building
    assert shutil.which("ninja") is not None and ninja.BIN_DIR in shutil.which("ninja")


def test_a_lock_that_goes_stale_while_waiting_is_cleared(tmp_path, monkeypatch):
    """A build killed just before another process arrived: its lock is fresh at first, then stale; the waiting
    process clears it rather than wait forever in torch's builder."""
    import time

    monkeypatch.setattr(decode_attention, "STALE_LOCK_SECONDS", 1.5)
    lock = tmp_path / "lock"
    lock.touch()
    started = time.time()
    decode_attention.wait_for_other_build(lock)
    assert not lock.exists() and 1.5 <= time.time() - started < 10
    decode_attention.wait_for_other_build(lock)  # no lock: returns at once
