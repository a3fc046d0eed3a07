"""Freed memory kept in the heap while compressing: set on entry, handed back on leaving,
nothing changed where the user chose the allocator's thresholds or the C library is not glibc."""

from __future__ import annotations

import pytest

from datafree.toolchain import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    for key in heap.USER_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    return fake


def test_blocks_stay_in_the_heap_inside_and_are_handed_back_after(libc):
    with heap.reused():
        assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, heap.THRESHOLD),
                              ("mallopt", heap.M_TRIM_THRESHOLD, heap.THRESHOLD)]
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, heap.DYNAMIC_MMAP_MAX),
                              ("mallopt", heap.M_TRIM_THRESHOLD, 2 * heap.DYNAMIC_MMAP_MAX),
                              ("malloc_trim", 0)]


def test_nested_use_changes_nothing_until_the_outer_one_ends(libc):
    with heap.reused():
        with heap.reused():
            pass
        assert len(libc.calls) == 2
    assert len(libc.calls) == 5


def test_settings_are_restored_when_the_work_fails(libc):
    with pytest.raises(RuntimeError):
        with heap.reused():
            raise RuntimeError("stage failed")
    assert libc.calls[-1] == ("malloc_trim", 0)
    with heap.reused():        # and the next use sets them again
        pass
    assert len(libc.calls) == 10


@pytest.mark.parametrize("key", heap.USER_SETTINGS)
def test_the_users_own_thresholds_stand(libc, monkeypatch, key):
    monkeypatch.setenv(key, "131072")
    assert not heap.applies()
    with heap.reused():
        pass
    assert libc.calls == []


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert not heap.applies()
    with heap.reused():
        pass


def test_compress_runs_inside_it(monkeypatch, tmp_path):
    """The whole pipeline runs with the heap kept (a pass seeing it unset would pay the
    page faults again)."""
    from datafree.toolchain import compress as C
    from datafree.toolchain.recipe import Recipe

    import zoo

    seen = []

    class Probe:
        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    monkeypatch.setattr(heap, "reused", Probe)
    import datafree.toolchain.stages.load as load

    real = load.load
    monkeypatch.setattr(load, "load", lambda ctx, source: (seen.append("load"), real(ctx, source))[1])
    _, path = zoo.build("conv_bn_relu_conv", tmp_path)
    C.compress(path, Recipe(wbits=8, synthetic=0), measure=False)
    assert seen == ["enter", "load", "exit"]
