import pytest

from memo.planner import parse_bandwidth, parse_bytes, parse_count, solve_alpha


def test_parse_sizes():
    assert parse_bytes("64GiB") == 64 * 2**30
    assert parse_bytes("2TB") == 2 * 10**12
    assert parse_bytes("512M") == 512 * 2**20
    assert parse_bytes(123) == 123
    assert parse_count("1M") == 2**20
    assert parse_count("128K") == 131072
    assert parse_bandwidth("25GB/s") == 25e9
    with pytest.raises(ValueError, match="cannot read size"):
        parse_bytes("lots")


def test_alpha_closed_form():
    # copies of 1 GB/s for 1 s hide 1 GB; fixed part 0.5 GB, other 1 GB -> time bound 0.5
    r = solve_alpha(s_in=0.25e9, s_attn=0.25e9, s_other=1e9, bandwidth=1e9, t_fwd=1.0,
                    n_layers=10, keep_layers=2, host_budget=1e12)
    assert r.alpha == pytest.approx(0.5) and r.hidden and r.fits
    # host budget of 8 layers x 1 GB -> memory bound 0.5 as well; tighter budget wins
    r = solve_alpha(s_in=0.25e9, s_attn=0.25e9, s_other=1e9, bandwidth=1e12, t_fwd=1.0,
                    n_layers=10, keep_layers=2, host_budget=8 * 0.75e9)
    assert r.alpha == pytest.approx(0.25) and "host memory" in r.reason
    # fixed part alone cannot hide
    r = solve_alpha(s_in=1e9, s_attn=1e9, s_other=1e9, bandwidth=1e9, t_fwd=1.0,
                    n_layers=4, keep_layers=2, host_budget=1e12)
    assert r.alpha == 0.0 and not r.hidden
