import numpy as np
import pytest
import torch

from gradcomp.numerics.pruning import stochastic_prune
from gradcomp.numerics.random import (
    COUNTER_COLUMNS,
    SEED_HIGH,
    StepStreams,
    counter_columns,
    counter_layout,
    counter_like,
    draw_keys,
    draw_seed,
    host_keys,
    keys_of_seed,
    keys_table,
    sample_values,
    seed_keys,
    stacked_keys,
    stream_seed,
    uniform_from_keys,
    uniform_like,
)


def test_sample_values_returns_every_element_of_a_small_tensor():
    x = torch.arange(10.0).reshape(2, 5)
    assert torch.equal(sample_values(x, 10), x.reshape(-1))
    assert torch.equal(sample_values(x, None), x.reshape(-1))


def test_sample_values_draws_with_replacement_and_repeats_with_the_seed():
    big = torch.arange(20000.0) % 100  # 20000 elements holding 100 distinct values
    a = sample_values(big, 5000, torch.Generator().manual_seed(1))
    b = sample_values(big, 5000, torch.Generator().manual_seed(1))
    assert a.shape == (5000,) and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 100)).all())
    assert not torch.equal(a, big[:5000])  # drawn, not a prefix
    # every value is hit (P(miss one) = 100 * 0.99^5000 ~ 1e-19): draws are spread over all
    assert a.unique().numel() == 100




def test_cpu_keys_equal_the_device_chain_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    edges = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, SEED_HIGH - 1, SEED_HIGH - 2**31]
    seeds = edges + [int(draw_seed(g, "cpu")) for _ in range(500)]
    for v in seeds:
        s = torch.tensor(v, dtype=torch.int64)
        a, b = keys_of_seed(s), stacked_keys(s)
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), v
        assert a.tolist() == host_keys(v), v
        for p, q in zip(a[:2], seed_keys(s)):
            assert torch.equal(p, q), v


def _splitmix64_oracle(z: np.uint64) -> np.uint64:
    """SplitMix64's output for state z (Steele, Lea, Flood 2014), in numpy's wrapping uint64."""
    with np.errstate(over="ignore"):
        z = np.uint64(z) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_stream_seed_is_splitmix64_chained_over_step_stream_and_draw():
    # the oracle is SplitMix64: its first output from state 0 is the published 0xE220A8397B1DCDAF
    assert int(_splitmix64_oracle(np.uint64(0))) == 0xE220A8397B1DCDAF
    for seed, step, stream, draw in [(0, 0, 0, 0), (7, 123456, 3, 1), (2**64 - 1, 2**40, 99, 5)]:
        z = _splitmix64_oracle(np.uint64(seed))
        for v in (step, stream, draw):
            z = _splitmix64_oracle(z ^ np.uint64(v))
        assert stream_seed(seed, step, stream, draw) == int(z) >> 2


def test_stream_seeds_differ_across_steps_streams_and_draws():
    got = {stream_seed(5, k, i, d) for k in range(64) for i in range(16) for d in range(4)}
    assert len(got) == 64 * 16 * 4
    assert all(0 <= v < SEED_HIGH for v in got)
    assert stream_seed(5, 1, 2, 0) != stream_seed(6, 1, 2, 0)


@pytest.mark.parametrize("bad", [{"seed": -1}, {"step": 2**64}, {"stream": 1.0}, {"draw": None}])
def test_stream_seed_rejects_what_is_not_a_64_bit_count(bad):
    args = {"seed": 0, "step": 0, "stream": 0, "draw": 0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        stream_seed(**args)


def test_step_streams_give_each_draw_its_documented_keys():
    st = StepStreams(11, 3)
    st.set_step(4)
    first = [draw_keys(st.stream(i), "cpu") for i in range(3)]
    second = draw_keys(st.stream(1), "cpu")  # a second call of stream 1 in the same step
    for i, k in enumerate(first):
        assert k.dtype == torch.int32 and k.tolist() == host_keys(stream_seed(11, 4, i, 0))
    assert second.tolist() == host_keys(stream_seed(11, 4, 1, 1))
    st.set_step(4)  # the same step again: the same keys, draw counters from 0
    assert torch.equal(draw_keys(st.stream(1), "cpu"), first[1])
    st.set_step(5)
    assert not torch.equal(draw_keys(st.stream(1), "cpu"), first[1])
    with pytest.raises(TypeError, match="draw_keys"):
        draw_seed(st.stream(0), "cpu")
    with pytest.raises(ValueError, match="step"):
        st.set_step(-1)
    with pytest.raises(ValueError, match="streams"):
        StepStreams(0, 0)
    with pytest.raises(ValueError, match="index"):
        st.stream(3)


def test_step_streams_count_draws_per_device_and_key_other_ordinals_apart():
    st = StepStreams(2, 2)
    st.set_step(1)
    # a draw on another device ("meta": an accelerator's path, the copy included, without
    # values) does not advance the CPU's counter of the same stream
    meta = draw_keys(st.stream(0), "meta")
    assert meta.device.type == "meta" and meta.dtype == torch.int32 and meta.shape == (4,)
    assert draw_keys(st.stream(0), "cpu").tolist() == host_keys(stream_seed(2, 1, 0, 0))
    # device ordinal o keys stream i as i + 2^32 o: a second device's replica draws new noise,
    # the first accelerator the CPU's
    assert st.keys_at(1, 0, 0) == host_keys(stream_seed(2, 1, 1, 0))
    assert st.keys_at(1, 0, 3) == host_keys(stream_seed(2, 1, 1 + (3 << 32), 0))
    assert st.keys_at(1, 0, 3) != st.keys_at(1, 0, 0)


def test_keys_table_is_host_keys_of_stream_seed_for_every_stream():
    # the vectorised chain (numpy uint64 arrays) equals the Python-integer one bit for bit,
    # over the whole range of every argument
    rng = np.random.default_rng(0)
    top = np.iinfo(np.uint64).max
    for seed, step, draw in [(0, 0, 0), (2**64 - 1, 2**64 - 1, 2**64 - 1), (5, 1, 1)] + [
            tuple(int(v) for v in rng.integers(0, top, 3, dtype=np.uint64, endpoint=True))
            for _ in range(20)]:
        streams = np.concatenate([np.arange(3, dtype=np.uint64), np.array(
            [2**32 + 1, 2**64 - 1], dtype=np.uint64), rng.integers(0, top, 3, dtype=np.uint64)])
        table = keys_table(seed, step, streams, draw)
        assert table.dtype == np.int32 and table.shape == (streams.size, 4)
        for row, i in zip(table, streams):
            assert row.tolist() == host_keys(stream_seed(seed, step, int(i), draw))


def test_step_streams_take_each_draw_from_one_table_per_step():
    st = StepStreams(7, 5)
    for step in (0, 3):
        st.set_step(step)
        for draw in (0, 1):
            for i in (4, 0, 2):
                k = draw_keys(st.stream(i), "cpu")
                assert k.tolist() == st.keys_at(i, draw) == host_keys(stream_seed(7, step, i,
                                                                                   draw))
        assert len(st._tables) == 2  # one table per draw of the step, every stream in it


def test_draw_keys_with_columns_is_the_same_draw_followed_by_the_counter_columns():
    cols = list(range(COUNTER_COLUMNS))
    st, twin = StepStreams(7, 3), StepStreams(7, 3)
    for s in (st, twin):
        s.set_step(2)
    # the same draws in the same order: with or without the columns, each call takes the
    # stream's next draw (a layout call does not skip or repeat one)
    for i, columns in [(1, True), (1, False), (0, True), (1, True), (2, False)]:
        got, plain = draw_keys(st.stream(i), "cpu", columns), draw_keys(twin.stream(i), "cpu")
        assert got.dtype == torch.int32 and got.is_contiguous()
        assert got.tolist() == plain.tolist() + (cols if columns else [])
    # a torch.Generator: one seed per call either way; elsewhere than the CPU the four keys
    a = draw_keys(torch.Generator().manual_seed(5), "cpu", True)
    b = draw_keys(torch.Generator().manual_seed(5), "cpu")
    assert a.tolist() == b.tolist() + cols
    assert draw_keys(st.stream(0), "meta", True).shape == (4,)


def test_counter_layout_takes_keys_that_carry_their_columns_as_they_are():
    keys = draw_keys(torch.Generator().manual_seed(1), "cpu")
    full = draw_keys(torch.Generator().manual_seed(1), "cpu", True)
    for n in (64 * 1024, 4096 + 3):  # the 2-D layout, and a size that keeps a flat pass
        x = torch.zeros(n)
        (xa, ka), (xb, kb) = counter_layout(x, keys, True), counter_layout(x, full, True)
        assert xa.shape == xb.shape and torch.equal(ka, kb)
        assert torch.equal(counter_like(xa, ka), counter_like(xb, kb))
    assert counter_layout(torch.zeros(64 * 1024), full, True)[1] is full  # no new tensor
    # any shape: its elements in order (a contiguous tensor's view, a strided one's copy)
    x = torch.arange(64 * 1024, dtype=torch.float32)
    for shaped in (x.view(8, 32, 256), x.view(256, 256).t().contiguous().t()):
        got, _ = counter_layout(shaped, full, True)
        want, _ = counter_layout(shaped.reshape(-1), full, True)
        assert torch.equal(got, want) and (got.data_ptr() == shaped.data_ptr()) \
            == shaped.is_contiguous()
    assert counter_layout(x[:4101 * 15].view(4101, 15), keys, True)[0].shape == (4101 * 15,)


def test_a_stream_keys_the_operator_with_its_documented_seed():
    # Eq. 5 written out with u from the keys of stream_seed(3, 9, 1, 0): the operator called
    # with stream 1 at step 9 gives exactly that
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    st = StepStreams(3, 2)
    st.set_step(9)
    got = stochastic_prune(x, 0.8, st.stream(1))
    k = torch.tensor(host_keys(stream_seed(3, 9, 1, 0)), dtype=torch.int32)
    u = uniform_from_keys(k[0], k[1], x.numel())
    a = torch.tensor(0.8, dtype=torch.float32)
    small = torch.where(a * u < x.abs(), torch.where(x < 0, -a, a), torch.zeros_like(x))
    assert torch.equal(got, torch.where(x.abs() >= a, x, small))
    st.set_step(9)
    assert torch.equal(stochastic_prune(x, 0.8, st.stream(1)), got)  # repeatable
    assert not torch.equal(stochastic_prune(x, 0.8, st.stream(0)), got)  # another stream


@pytest.mark.parametrize("n", [64 * 1024, 1605632, 1024 * 1024, 1028 * 1024, 3 * 1024 * 77])
def test_the_2d_counter_layout_draws_what_the_flat_pass_draws(n):
    keys = draw_keys(torch.Generator().manual_seed(n), "cpu")
    width = counter_columns(n, "cpu")
    rows = n // width
    assert width and n % width == 0 and rows >= 64 and rows not in (width, 4 + COUNTER_COLUMNS)
    x, wide = counter_layout(torch.zeros(n), keys, True)
    assert x.shape == (rows, width)
    assert torch.equal(wide[:4], keys) and torch.equal(wide[4:], torch.arange(COUNTER_COLUMNS,
                                                                              dtype=torch.int32))
    for start in (0, 12345):
        assert torch.equal(counter_like(x, wide, start).reshape(-1),
                           torch.arange(start, start + n, dtype=torch.int32))
        assert torch.equal(uniform_like(wide, x, torch.float64, start).reshape(-1),
                           uniform_from_keys(keys[0], keys[1], n, "cpu", torch.float64, start))
    # the eager path and other devices keep the flat layout
    flat = torch.zeros(n)
    assert counter_layout(flat, keys, False)[0] is flat
    assert counter_columns(n, "meta") == 0


@pytest.mark.parametrize("n", [4096, 10_007, 63 * 64, 2 * 3 * 5 * 7 * 11 * 13, 0])
def test_sizes_without_a_fitting_row_stay_flat(n):
    # 4096 = 64 x 64 (rows equal to the width would share dynamo's size symbol), an odd
    # size, fewer than 64 rows of 64, no power-of-two factor of 64, nothing
    assert counter_columns(n, "cpu") == 0
