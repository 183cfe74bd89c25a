"""Samplers against values computed with the official schedulers (tables and a solver toy), plus properties."""
import pytest
import torch

from wantalk.wanvideo.schedulers import SCHEDULERS, make_scheduler, shift_sigmas

# (steps, shift): (DiT timesteps, sigmas), from the official FlowUniPCMultistepScheduler.set_timesteps.
UNIPC = {
    (40, 5.0): ([999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846, 833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113],
                [0.99979985, 0.99469477, 0.98937702, 0.98383301, 0.97804803, 0.97200602, 0.96568942, 0.95907909, 0.95215404, 0.94489127, 0.93726546, 0.92924869, 0.9208101, 0.91191548, 0.90252686, 0.89260185, 0.88209325, 0.87094796, 0.85910624, 0.84650087, 0.83305538, 0.81868291, 0.80328429, 0.78674537, 0.76893473, 0.74969983, 0.7288627, 0.70621437, 0.68150812, 0.65444994, 0.62468737, 0.59179348, 0.55524677, 0.51440299, 0.46845692, 0.41638881, 0.3568877, 0.2882396, 0.2081597, 0.11353305, 0.0]),
    (40, 3.0): ([999, 991, 982, 973, 963, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 832, 817, 801, 785, 767, 749, 730, 710, 688, 666, 642, 617, 590, 562, 531, 499, 465, 428, 388, 345, 299, 249, 195, 136, 71],
                [0.99966645, 0.99118912, 0.98241949, 0.97334236, 0.9639411, 0.95419812, 0.94409442, 0.9336096, 0.92272168, 0.91140693, 0.89963979, 0.88739252, 0.87463522, 0.86133522, 0.84745729, 0.83296275, 0.8178097, 0.80195218, 0.78533995, 0.76791769, 0.74962479, 0.7303943, 0.71015221, 0.68881649, 0.66629612, 0.64248967, 0.61728358, 0.59055084, 0.56214833, 0.53191453, 0.49966657, 0.4651961, 0.42826521, 0.38860077, 0.34588751, 0.29975995, 0.24979164, 0.19548202, 0.13623966, 0.07136054, 0.0]),
    (50, 5.0): ([999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92],
                [0.99979985, 0.99573237, 0.99153048, 0.98718739, 0.98269582, 0.97804803, 0.97323579, 0.96825016, 0.96308166, 0.95771992, 0.95215404, 0.94637203, 0.94036108, 0.9341073, 0.92759573, 0.9208101, 0.91373265, 0.90634418, 0.8986237, 0.89054847, 0.88209325, 0.8732307, 0.86393064, 0.85415983, 0.84388161, 0.83305538, 0.82163614, 0.80957383, 0.79681247, 0.78328955, 0.76893473, 0.7536689, 0.73740238, 0.72003359, 0.70144641, 0.68150812, 0.66006571, 0.63694239, 0.6119324, 0.584795, 0.55524677, 0.52295148, 0.48750731, 0.44843021, 0.4051314, 0.3568877, 0.30280069, 0.24174035, 0.17226514, 0.09250686, 0.0]),
    (10, 5.0): ([999, 978, 952, 920, 882, 833, 768, 681, 555, 356],
                [0.99979985, 0.97804803, 0.95215404, 0.9208101, 0.88209325, 0.83305538, 0.76893473, 0.68150812, 0.55524677, 0.3568877, 0.0]),
}
# From the official get_sampling_sigmas + FlowDPMSolverMultistepScheduler.set_timesteps(sigmas=...).
DPMPP = {
    (40, 5.0): ([1000, 994, 989, 984, 978, 972, 965, 959, 952, 945, 937, 929, 921, 912, 902, 892, 882, 871, 859, 846, 833, 818, 803, 787, 769, 750, 729, 706, 681, 654, 625, 592, 555, 514, 468, 416, 357, 288, 208, 113],
                [1.0, 0.99489796, 0.98958331, 0.98404253, 0.97826087, 0.97222221, 0.96590906, 0.95930231, 0.95238096, 0.94512194, 0.9375, 0.92948717, 0.92105263, 0.91216218, 0.90277779, 0.89285713, 0.88235295, 0.87121212, 0.859375, 0.84677422, 0.83333331, 0.81896549, 0.8035714, 0.78703701, 0.76923078, 0.75, 0.72916669, 0.70652175, 0.68181819, 0.65476191, 0.625, 0.59210527, 0.55555558, 0.5147059, 0.46875, 0.41666666, 0.35714287, 0.28846154, 0.20833333, 0.11363637, 0.0]),
    (10, 5.0): ([1000, 978, 952, 921, 882, 833, 769, 681, 555, 357],
                [1.0, 0.97826087, 0.95238096, 0.92105263, 0.88235295, 0.83333331, 0.76923078, 0.68181819, 0.55555558, 0.35714287, 0.0]),
}
# InfiniteTalk wan/multitalk.py times (float32, incl. the final 0).
INFINITETALK = {
    (40, 7.0): [1000.0, 996.25854, 992.34515, 988.24786, 983.95337, 979.44696, 974.71271, 969.73285, 964.48755, 958.95532, 953.11182, 946.92993, 940.37952, 933.4267, 926.0329, 918.15497, 909.74396, 900.74341, 891.08942, 880.70813, 869.5141, 857.4079, 844.2735, 829.97382, 814.3468, 797.19855, 778.29559, 757.35413, 734.02551, 707.87701, 678.36444, 644.79388, 606.2666, 561.59741, 509.19022, 446.84384, 371.43457, 278.3765, 160.65269, 6.95825, 0.0],
    (8, 2.0): [1000.0, 923.15973, 833.52771, 727.61969, 600.55975, 445.30814, 251.31151, 1.998, 0.0],
    (4, 7.0): [1000.0, 933.4267, 778.29559, 6.95825, 0.0],
}
# The official schedulers on test_solver_toy_matches_official's toy model, steps 10, shift 5: final sum and
# x[0,0,0,0,:].
TOY = {
    "unipc": (0.18727052, [-0.9878637194633484, -0.9618675708770752, -0.9049675464630127]),
    "dpm++": (0.19169503, [-0.9879050850868225, -0.9619511961936951, -0.9044015407562256]),
}


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("name, table", [("unipc", UNIPC), ("dpm++", DPMPP)])
def test_integer_timestep_tables(name, table):
    for (steps, shift), (timesteps, sigmas) in table.items():
        sched = make_scheduler(name, steps, shift)
        assert sched.timesteps.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
        assert sched.timesteps.tolist() == [float(t) for t in timesteps], (steps, shift)
        torch.testing.assert_close(sched.sigmas, f32(sigmas), rtol=0, atol=1e-7)
        assert sched.sigmas[-1].item() == 0.0 and len(sched) == steps


def test_unipc_first_sigma_is_not_one_but_dpmpp_is():
    assert make_scheduler("unipc", 40, 5.0).sigmas[0].item() == pytest.approx(0.99979985, abs=1e-8)
    assert make_scheduler("dpm++", 40, 5.0).sigmas[0].item() == 1.0


def test_infinitetalk_times():
    for (steps, shift), times in INFINITETALK.items():
        sched = make_scheduler("infinitetalk_euler", steps, shift)
        torch.testing.assert_close(sched.timesteps, f32(times[:-1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(sched.sigmas, f32(times) / 1000, rtol=1e-6, atol=1e-7)
        assert sched.timesteps[0].item() == 1000.0  # float, not truncated (pitfall 3)


def test_shift_transform():
    s = torch.rand(100, dtype=torch.float64)
    shift = 1 + 10 * torch.rand(()).item()
    expected = shift * s / (1 + (shift - 1) * s)
    torch.testing.assert_close(shift_sigmas(s, shift), expected, rtol=1e-15, atol=0)
    assert shift_sigmas(0.0, shift) == 0.0 and shift_sigmas(1.0, shift) == pytest.approx(1.0)
    assert shift_sigmas(0.5, 5.0) == pytest.approx(5 / 6)


def test_plain_euler_uses_the_wan_sampling_sigmas():
    sched, dpm = make_scheduler("euler", 10, 5.0), make_scheduler("dpm++", 10, 5.0)
    assert torch.equal(sched.sigmas, dpm.sigmas)
    torch.testing.assert_close(sched.timesteps, dpm.sigmas[:-1] * 1000)  # float, not truncated
    assert sched.timesteps[0].item() == 1000.0


@pytest.mark.parametrize("name", sorted(TOY))
def test_solver_toy_matches_official(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    target = torch.linspace(-1, 1, 72).reshape(1, 4, 2, 3, 3)
    sched = make_scheduler(name, 10, 5.0)
    for i, t in enumerate(sched.timesteps.to(torch.int64)):
        v = (x - target) / max(t / 1000, 1e-3) * 0.9 + 0.05 * torch.sin(x)
        x = sched.step(v, i, x)
    total, head = TOY[name]
    assert x.sum().item() == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(x[0, 0, 0, 0, :], f32(head), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps, shift", [(1, 5.0), (4, 7.0), (12, 3.0)])
def test_straight_flow_is_integrated_exactly(name, steps, shift, rng):
    """With the exact velocity of a straight path x_s = (1-s) x0 + s x1, every latent stays on the path."""
    x0, x1 = torch.randn(2, 2, 16, 3, 4, 5, generator=rng)
    sched = make_scheduler(name, steps, shift)
    latent = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * x1
    for i in range(len(sched)):
        latent = sched.step(x1 - x0, i, latent)
        on_path = (1 - sched.sigmas[i + 1].double()) * x0.double() + sched.sigmas[i + 1].double() * x1.double()
        torch.testing.assert_close(latent.double(), on_path, rtol=0, atol=2e-5)
    torch.testing.assert_close(latent, x0, rtol=0, atol=2e-5)


def test_euler_step_is_velocity_times_time_difference(rng):
    sched = make_scheduler("infinitetalk_euler", 6, 7.0)
    latent, v = torch.randn(2, 16, 2, 4, 4, generator=rng)
    times = torch.cat([sched.timesteps, torch.zeros(1)]).double()
    for i in range(len(sched)):
        expected = latent.double() - v.double() * (times[i] - times[i + 1]) / 1000
        latent = sched.step(v, i, latent)
        torch.testing.assert_close(latent.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_multistep_history_is_used_and_reset(name, rng):
    """A curved field: second-order solvers differ from Euler-like first order; reset() reproduces a run."""
    x_start = torch.randn(1, 16, 2, 4, 4, generator=rng)
    field = torch.randn(1, 16, 2, 4, 4, generator=rng)

    def run(sched):
        x = x_start.clone()
        for i in range(len(sched)):
            x = sched.step(torch.tanh(x) + field * sched.sigmas[i], i, x)
        return x

    sched = make_scheduler(name, 8, 5.0)
    first = run(sched)
    sched.reset()
    assert torch.equal(run(sched), first)
    assert not torch.allclose(first, run(make_scheduler("euler", 8, 5.0)), atol=1e-3)


def test_step_order_and_inputs_are_checked(rng):
    sched = make_scheduler("unipc", 5, 5.0)
    x = torch.randn(1, 16, 1, 2, 2, generator=rng)
    x = sched.step(torch.randn_like(x), 2, x)  # a run may begin mid-table
    with pytest.raises(RuntimeError, match="reset"):
        sched.step(torch.randn_like(x), 2, x)
    with pytest.raises(IndexError):
        sched.step(torch.randn_like(x), 5, x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.randn(1, 16, 1, 2, 3), 3, x)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        make_scheduler("euler", 10, 0.0)


def test_latent_dtype_is_kept_and_math_is_float32(rng):
    x = torch.randn(1, 16, 1, 2, 2, generator=rng)
    v = torch.randn_like(x)
    low = make_scheduler("unipc", 4, 5.0).step(v.bfloat16(), 0, x.bfloat16())
    full = make_scheduler("unipc", 4, 5.0).step(v.bfloat16().float(), 0, x.bfloat16().float())
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, full.bfloat16())
