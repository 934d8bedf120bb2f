"""Stage settings declared once: every field reaches the flags, scheme specs, checks, folder name and JSON.

The tests iterate over the fields, so a setting added to settings.py is covered here without
editing another file; the expectations (folder names, messages) are written out by hand.
"""

import dataclasses
import json

import pytest

from improved_diffusion import cli
from improved_diffusion.errors import ConfigError
from improved_diffusion.sampling import settings as st
from improved_diffusion.sampling.request import SchemeRequest, add_request_flags
from improved_diffusion.sampling.scheme import Scheme
from improved_diffusion.sampling.settings import FIELDS, StageSettings

# A value other than the default for every setting, valid together (df stabilization needs a level).
CHANGED = dict(scheduling_matrix="pyramid", uncertainty_scale=2.0, stabilization="df", stabilization_level=7,
               sampling_steps=4, use_ddim=True, eta=0.5, clip_noise=3.0, clip_denoised=False, guidance_scale=2.5,
               mcmc_steps=2, mcmc_step_size=0.05, mcmc_noise=True, mcmc_clamp="signal")


def test_every_setting_has_help_and_a_changed_value_here():
    assert set(CHANGED) == set(FIELDS)
    for name, f in FIELDS.items():
        assert f.metadata["help"], name
        assert CHANGED[name] != f.default, name


def test_every_setting_is_a_flag_of_the_sampling_scripts_with_no_default():
    parser = cli.ArgumentParser(prog="t")
    add_request_flags(parser)
    assert all(getattr(parser.parse_args([]), name) is None for name in FIELDS)
    argv = [item for name, value in CHANGED.items() for item in (f"--{name}", str(value))]
    args = parser.parse_args(argv)
    assert SchemeRequest.from_args(args).settings == CHANGED
    assert st.settings_from_dict(CHANGED) == StageSettings(**CHANGED)


def test_every_setting_is_a_scheme_spec_override():
    spec = "autoreg:" + ":".join(f"{name}={value}" for name, value in CHANGED.items())
    request = SchemeRequest().with_spec(spec)
    assert request.sampling_scheme == "autoreg" and request.settings == CHANGED


def test_folder_names_written_out():
    scheme = Scheme.from_preset("autoreg", T=20, max_frames=8, **CHANGED)
    assert scheme.folder_name() == ("autoreg_K8_S4_obs4_T20_pyramid2_dfstab7_steps4_ddim0.5_clipnoise3_noclip_cfg2.5"
                                    "_mcmc2x0.05_langevin_clamp-signal")
    assert Scheme.from_preset("autoreg", T=20, max_frames=8).folder_name() == "autoreg_K8_S4_obs4_T20"
    off_df = Scheme.from_preset("autoreg", T=20, max_frames=8, stabilization_level=3, use_ddim=True)
    assert off_df.folder_name() == "autoreg_K8_S4_obs4_T20_stab3_ddim"
    # every setting that is on shows in the name: turning one on changes it
    plain = st.folder_suffix(StageSettings())
    for name in ("scheduling_matrix", "stabilization_level", "sampling_steps", "use_ddim", "clip_noise",
                 "clip_denoised", "guidance_scale", "mcmc_steps"):
        assert st.folder_suffix(dataclasses.replace(StageSettings(), **{name: CHANGED[name]})) != plain, name


def test_json_round_trips_and_old_names_are_read():
    scheme = Scheme.from_preset("hierarchy-2", T=20, max_frames=8, **CHANGED)
    assert Scheme.from_json(json.dumps(scheme.to_dict())) == scheme
    old = {**scheme.to_dict(), "noise_schedule": "trapezoid"}
    del old["scheduling_matrix"]
    assert Scheme.from_dict(old).stage.scheduling_matrix == "trapezoid"
    assert Scheme.from_preset("autoreg", T=20, max_frames=8, noise_schedule="trapezoid").stage.scheduling_matrix \
        == "trapezoid"


def test_numbers_are_typed_as_their_fields():
    settings = st.settings_from_dict({"uncertainty_scale": 2, "use_ddim": 1, "eta": 0})
    assert type(settings.uncertainty_scale) is float and settings.use_ddim is True and type(settings.eta) is float
    assert st.parse_setting("mcmc_noise", "yes") is True and st.parse_setting("sampling_steps", "5") == 5
    with pytest.raises(ConfigError, match=r"^mcmc_noise must be boolean, got 'maybe'\.$"):
        st.parse_setting("mcmc_noise", "maybe")
    with pytest.raises(ConfigError, match="is not a stage setting"):
        st.parse_setting("T", "3")


@pytest.mark.parametrize("name, value, message", [
    ("scheduling_matrix", "nope", "unknown scheduling_matrix 'nope'; valid names are full_sequence, pyramid"),
    ("uncertainty_scale", float("inf"), "uncertainty_scale must be a finite number >= 0, got inf."),
    ("stabilization", "x", "unknown stabilization 'x'; valid names are generated, df."),
    ("stabilization_level", -1, "stabilization_level must be 0 (off) or positive, got -1."),
    ("sampling_steps", -1, "sampling_steps must be 0 (the diffusion's steps) or positive, got -1."),
    ("eta", -0.5, "eta must be a finite number >= 0, got -0.5."),
    ("clip_noise", -1.0, "clip_noise must be 0 (no bound) or a positive number, got -1.0."),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number >= 0 (1: no guidance), got nan."),
    ("mcmc_steps", 1.5, "mcmc_steps must be 0 (off) or a positive integer, got 1.5."),
    ("mcmc_steps", True, "mcmc_steps must be 0 (off) or a positive integer, got True."),
    ("mcmc_step_size", 0.0, "mcmc_step_size must be a finite number > 0, got 0.0."),
    ("mcmc_clamp", "x", "unknown mcmc_clamp 'x'"),
])
def test_each_check_is_one_sentence(name, value, message):
    with pytest.raises(ConfigError) as info:
        st.check_settings(dataclasses.replace(StageSettings(), **{name: value}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_old_flag_name_works_and_says_so_in_one_line(capsys):
    parser = cli.ArgumentParser(prog="video_sample.py")
    add_request_flags(parser)
    args = parser.parse_args(["--noise_schedule", "pyramid"])
    assert args.scheduling_matrix == "pyramid"
    assert capsys.readouterr().err == ("video_sample.py: warning: --noise_schedule is now --scheduling_matrix; the "
                                       "old name will be removed.\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--noise_schedule", "nope"])
