"""Sampling long videos: frame plans (FDM) x within-stage noise schedules (DF) x stabilization.

    plans.py            frame plans: which frames to observe and generate, stage by stage
    noise_schedules.py  within-stage noise-level matrices
    scheme.py           Scheme: one plan x schedule x stabilization, its presets, checks and JSON
    sampler.py          the stage sampler that runs a Scheme on a model
    df_step.py          Diffusion Forcing's per-frame update and context display (stabilization "df")
    mcmc.py             MCMC refinement with an energy model (energy descent or Langevin + Metropolis)
    run.py              sampling a dataset's test videos into a results folder (video_sample.py)
    describe.py         a Scheme shown without a model (video_schedule.py)
    plan_picture.py     a plan drawn as FDM's figure
"""
