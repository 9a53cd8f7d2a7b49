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


def _measured(**kw):
    from memo.planner.alpha import MeasuredStep
    base = dict(alpha=0.0, step_s=10.0, layer_forward_s=1.0, layer_backward_s=2.0, recompute_s_per_token=1e-3,
                tokens=1000, d2h_bandwidth=1e9, h2d_bandwidth=1e9)
    return MeasuredStep(**{**base, **kw})


def test_step_alpha_minimises_the_predicted_step_time():
    from memo.planner.alpha import predict_step_s, solve_step_alpha
    # Per layer: copies take 0.2 + 1.6 alpha s against a 1 s forward (they hide up to alpha 0.5);
    # recomputing every token takes 1 s. cost(alpha) = (1 - alpha) + max(0, 1.6 alpha - 0.8).
    m = _measured()
    kw = dict(s_fixed=0.2e9, s_other=1.6e9, swapped_layers=4)
    r = solve_step_alpha(m, host_budget=1e12, **kw)
    assert r.alpha == pytest.approx(0.5) and r.hidden
    assert r.predicted_step_s == pytest.approx(10.0 + 4 * (0.5 - 1.0))
    assert predict_step_s(0.0, m, **kw) == m.step_s                            # anchored at the measurement
    assert predict_step_s(1.0, m, **kw) == pytest.approx(10.0 + 4 * (0.8 - 1.0))
    assert {a for a, _ in r.candidates} >= {0.0, 0.5, 1.0}
    # The host holds a quarter of the other activations: the memory bound wins.
    r = solve_step_alpha(m, host_budget=4 * (0.2e9 + 0.25 * 1.6e9), **kw)
    assert r.alpha == pytest.approx(0.25) and "host memory" in r.reason
    assert r.predicted_step_s == pytest.approx(10.0 + 4 * (0.75 - 1.0))
    # From a step measured at alpha 0.5, alpha 0 is predicted one recompute (0.5 s per layer) slower.
    assert predict_step_s(0.0, _measured(alpha=0.5, step_s=8.0), **kw) == pytest.approx(10.0)


def test_step_alpha_is_zero_when_copies_cannot_hide_or_copying_in_is_exposed():
    from memo.planner.alpha import solve_step_alpha
    kw = dict(s_fixed=0.2e9, s_other=1.6e9, swapped_layers=4, host_budget=1e12)
    r = solve_step_alpha(_measured(d2h_bandwidth=0.1e9), **kw)   # 2 s of copies per 1 s forward
    assert r.alpha == 0.0 and not r.hidden and "cannot hide" in r.reason
    # Copies out hide, copies in do not: the backward (0.1 s) + recompute cannot cover 1.8 s of copy in.
    r = solve_step_alpha(_measured(d2h_bandwidth=1e12, layer_backward_s=0.1, h2d_bandwidth=0.5e9), **kw)
    # in(alpha) = 0.4 + 3.2 alpha = 0.1 + 1 - alpha  ->  alpha = 0.7 / 4.2
    assert r.alpha == pytest.approx(0.7 / 4.2)
