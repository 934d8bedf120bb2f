"""FDM users' import paths keep working and name the same objects as the new layout."""

import importlib

import pytest


@pytest.mark.parametrize("old, new", [
    ("improved_diffusion.gaussian_diffusion", "improved_diffusion.diffusion.gaussian_diffusion"),
    ("improved_diffusion.unet", "improved_diffusion.models.unet"),
    ("improved_diffusion.sampling_schemes", "improved_diffusion.sampling.plans"),
])
def test_old_module_is_the_new_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_fdm_names_resolve():
    # Imported here, as an FDM user's code imports them: the import statements are what is tested.
    from improved_diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
    from improved_diffusion.sampling_schemes import sampling_schemes
    from improved_diffusion.script_util import load_checkpoint
    from improved_diffusion.unet import UNetVideoModel

    from improved_diffusion import checkpoints, diffusion, models
    from improved_diffusion.sampling import plans

    assert load_checkpoint is checkpoints.load_checkpoint
    assert GaussianDiffusion is diffusion.GaussianDiffusion
    assert get_named_beta_schedule("linear", 10).shape == (10,)
    assert UNetVideoModel is models.UNetVideoModel
    assert sampling_schemes is plans.sampling_schemes
    plan = sampling_schemes["hierarchy-2"](video_length=300, num_obs=36, max_frames=20, step_size=10)
    obs, latent = next(plan)
    assert len(latent) == 10 and max(obs) < 36


def test_every_user_error_shares_one_base():
    from improved_diffusion import errors

    classes = [getattr(errors, n) for n in dir(errors) if n.endswith("Error") and n != "UserError"]
    assert len(classes) >= 7
    assert all(issubclass(c, errors.UserError) for c in classes)
