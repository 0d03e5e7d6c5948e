"""The sampler interface against diffusers' own schedulers (outside oracles) and the inversion round trip."""
from __future__ import annotations

import pytest
import torch

from tokenflow.errors import ConfigError, ModelLoadError
from tokenflow.samplers import DDIMSampler, FlowMatchEulerSampler, Grid, NoiseLevel, calculate_shift, sampler_for

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # stable-diffusion-3(.5)-medium scheduler_config.json
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev


def _flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def _velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """A smooth, latent-dependent stand-in for a model's velocity (deterministic, nonlinear in x and t)."""
    return torch.tanh(x * 0.7 + t / 1000.0) - 0.3 * x


@pytest.mark.parametrize("config,seq_len", [(SD3_SCHEDULER, None), (FLUX_SCHEDULER, 1024), (FLUX_SCHEDULER, 4096),
                                            ({**SD3_SCHEDULER, "shift_terminal": 0.1}, None)])
@pytest.mark.parametrize("n_steps", [1, 4, 28])
def test_flow_match_sampling_equals_the_diffusers_scheduler_loop(config, seq_len, n_steps):
    """Every σ, timestep and Euler step equals FlowMatchEulerDiscreteScheduler's (shift, dynamic shifting with μ
    from the token count, terminal stretching), bit for bit."""
    scheduler = _flow_scheduler(**config)
    sampler = FlowMatchEulerSampler(scheduler)
    if n_steps == 1 and config.get("shift_terminal"):  # diffusers' stretch divides by zero: refused, not NaN
        with pytest.raises(ConfigError, match="not finite"):
            sampler.grid(n_steps)
        return
    grid = sampler.grid(n_steps, image_seq_len=seq_len)
    ref = _flow_scheduler(**config)
    mu = None if seq_len is None else calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    ref.set_timesteps(n_steps, **({} if mu is None else {"mu": mu}))
    assert grid.timesteps == [float(t) for t in ref.timesteps]
    assert [lv.value for lv in grid.levels] + [grid.end.value] == [float(s) for s in ref.sigmas]
    assert grid.end.is_clean_end and grid.end.value == 0.0 and len(grid) == n_steps

    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours, theirs = x0.clone(), x0.clone()
    for i, level in enumerate(grid.levels):
        ours = sampler.step(ours, _velocity(ours, level.timestep), level, grid.after(i))
        t = ref.timesteps[i]
        theirs = ref.step(_velocity(theirs, float(t)), t, theirs).prev_sample
    assert torch.equal(ours, theirs)


def test_dynamic_shifting_moves_the_grid_with_the_image_size_and_needs_it():
    sampler = FlowMatchEulerSampler(_flow_scheduler(**FLUX_SCHEDULER))
    small, large = sampler.grid(10, image_seq_len=256), sampler.grid(10, image_seq_len=4096)
    assert all(a.value < b.value for a, b in zip(small.levels[1:], large.levels[1:]))  # larger images: noisier
    with pytest.raises(ConfigError, match="image_seq_len"):
        sampler.grid(10)


def test_flow_match_forward_process_and_its_inverse():
    sampler = FlowMatchEulerSampler(_flow_scheduler(**SD3_SCHEDULER))
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    level = sampler.grid(10).levels[3]
    xt = sampler.add_noise(x0, eps, level)
    torch.testing.assert_close(xt, (1 - level.value) * x0 + level.value * eps)
    torch.testing.assert_close(sampler.noise_from_latent(x0, xt, level), eps, rtol=1e-5, atol=1e-5)
    # the velocity of the straight path is ε - x0: one exact Euler step from σ to 0 lands on x0
    torch.testing.assert_close(sampler.step(xt, eps - x0, level, NoiseLevel(None, 0.0)), x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="σ = 0"):
        sampler.noise_from_latent(x0, x0, NoiseLevel(None, 0.0))


def test_euler_inversion_with_fixed_point_refinement_round_trips():
    """Euler-ODE inversion (velocity at the level reached) then Euler sampling returns to the start: plain
    inversion within a bound set by the velocity's variation, fixed-point refinement to float precision."""
    sampler = FlowMatchEulerSampler(_flow_scheduler(**SD3_SCHEDULER))
    grid = sampler.grid(20)
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))

    def invert(refine: int) -> torch.Tensor:
        x, source = x0.clone(), grid.end
        for i in reversed(range(len(grid))):
            target = grid.levels[i]
            x_t = sampler.step(x, _velocity(x, target.timestep), source, target)
            for _ in range(refine):
                x_t = sampler.step(x, _velocity(x_t, target.timestep), source, target)
            x, source = x_t, target
        return x

    def sample(x: torch.Tensor) -> torch.Tensor:
        for i, level in enumerate(grid.levels):
            x = sampler.step(x, _velocity(x, level.timestep), level, grid.after(i))
        return x

    plain = (sample(invert(0)) - x0).abs().max().item()
    refined = (sample(invert(8)) - x0).abs().max().item()
    assert plain < 0.2
    assert refined < 1e-4 < plain


def test_ddim_sampler_equals_ddim_scheduler_and_inverse_scheduler(tiny):
    """DDIMSampler steps equal diffusers' DDIMScheduler (sampling) and DDIMInverseScheduler (inversion)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    sampler = sampler_for(tiny.scheduler)
    assert isinstance(sampler, DDIMSampler) and sampler.form == "epsilon"
    grid = sampler.grid(10)
    ref = DDIMScheduler.from_config(tiny.scheduler.config)
    ref.set_timesteps(10)
    assert grid.timesteps == [int(t) for t in ref.timesteps]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours, theirs = x.clone(), x.clone()
    for i, level in enumerate(grid.levels):
        eps = _velocity(ours, level.timestep)
        ours = sampler.step(ours, eps, level, grid.after(i))
        theirs = ref.step(_velocity(theirs, level.timestep), level.timestep, theirs, eta=0.0).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=5e-5)  # float32 ᾱ there, float64 here

    inverse = DDIMInverseScheduler.from_config(tiny.scheduler.config)
    inverse.set_timesteps(10)
    up = list(reversed(range(len(grid))))
    ours, theirs = x.clone(), x.clone()
    for j, i in enumerate(up):
        target = grid.levels[i]
        source = grid.after(i)
        ours = sampler.step(ours, _velocity(ours, target.timestep), source, target)
        t = inverse.timesteps[j]
        theirs = inverse.step(_velocity(theirs, int(t)), t, theirs).prev_sample
        assert int(t) == target.timestep
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=5e-5)


def test_grid_slices_keep_the_clean_end():
    sampler = FlowMatchEulerSampler(_flow_scheduler(**SD3_SCHEDULER))
    grid = sampler.grid(10)
    tail = grid[4:]
    assert isinstance(tail, Grid) and len(tail) == 6 and tail.end == grid.end
    assert tail.after(5) == grid.end and tail.after(0) == grid.levels[5]
    assert grid.level_of(grid.timesteps[2]) == grid.levels[2]
    with pytest.raises(ConfigError, match="between 1 and 1000"):
        sampler.grid(0)


def test_sampler_for_picks_by_scheduler_and_refuses_what_cannot_be_inverted():
    assert isinstance(sampler_for(_flow_scheduler(**SD3_SCHEDULER)), FlowMatchEulerSampler)
    with pytest.raises(ModelLoadError, match="stochastic_sampling"):
        sampler_for(_flow_scheduler(**SD3_SCHEDULER, stochastic_sampling=True))
    a, b = FlowMatchEulerSampler(_flow_scheduler(shift=3.0)), FlowMatchEulerSampler(_flow_scheduler(shift=1.0))
    assert a.settings() != b.settings() and a.name == "flow_match_euler"
