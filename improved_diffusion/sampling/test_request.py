"""A SchemeRequest resolved against a checkpoint's config: sizes, checkpoint defaults, given settings, specs."""

import pytest

from improved_diffusion.errors import ConfigError
from improved_diffusion.sampling.request import SchemeRequest, scheme_for_checkpoint

CONFIG = {"T": 24, "max_frames": 8, "diffusion_steps": 100, "image_size": 16}
DF_CONFIG = {**CONFIG, "sampling_timesteps": 20, "stabilization_level": 15, "ddim_sampling_eta": 0.5,
             "clip_noise": 6.0}


def test_sizes_of_minus_one_are_the_checkpoints():
    scheme = scheme_for_checkpoint(CONFIG, SchemeRequest("hierarchy-2"))
    assert (scheme.T, scheme.max_frames, scheme.step_size, scheme.n_obs) == (24, 8, 4, 4)
    with pytest.raises(ConfigError, match="exceeds the 8 frames"):
        scheme_for_checkpoint(CONFIG, SchemeRequest(max_frames=9))
    with pytest.raises(ConfigError, match="--n_obs 24 given frames leave none"):
        scheme_for_checkpoint(CONFIG, SchemeRequest(n_obs=24))


def test_a_df_config_gives_the_settings_left_unset_and_given_ones_win():
    scheme = scheme_for_checkpoint(DF_CONFIG, SchemeRequest("autoreg"))
    st = scheme.stage
    assert (st.stabilization, st.stabilization_level, st.eta, st.sampling_steps, st.use_ddim, st.clip_noise,
            st.clip_denoised) == ("df", 15, 0.5, 20, True, 6.0, False)
    st = scheme_for_checkpoint(DF_CONFIG, SchemeRequest("autoreg").with_settings(eta=0.0, stabilization_level=3)).stage
    assert (st.eta, st.stabilization_level, st.sampling_steps) == (0.0, 3, 20)


def test_a_spec_sets_its_preset_plan_options_and_settings_over_the_shared_ones():
    shared = SchemeRequest(T=30).with_settings(guidance_scale=2.0, eta=0.1)
    request = shared.with_spec("autoreg:chunk_size=2:eta=0.3")
    assert (request.sampling_scheme, request.T, request.chunk_size) == ("autoreg", 30, 2)
    assert request.settings == {"guidance_scale": 2.0, "eta": 0.3}
    scheme = scheme_for_checkpoint({**CONFIG, "cond_dim": 2}, request)
    assert (scheme.plan, scheme.step_size, scheme.stage.eta) == ("sliding-window", 2, 0.3)
    with pytest.raises(ConfigError, match="chunk_size must be int, got 'two'"):
        shared.with_spec("autoreg:chunk_size=two")


def test_mcmc_needs_an_energy_checkpoint():
    request = SchemeRequest().with_settings(mcmc_steps=2)
    with pytest.raises(ConfigError, match="trained without --energy True"):
        scheme_for_checkpoint(CONFIG, request)
    assert scheme_for_checkpoint({**CONFIG, "energy": True}, request).stage.mcmc_steps == 2
