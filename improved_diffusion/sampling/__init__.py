"""Sampling long videos: frame plans (FDM) x within-stage noise schedules (DF) x stabilization.

    plans.py              frame plans: which frames to observe and generate, stage by stage
    adaptive_choice.py    how adaptive plans choose observed frames (LPIPS or thumbnails, farthest first)
    noise_schedules.py    within-stage noise-level matrices (the scheduling matrix)
    settings.py           StageSettings: every within-stage setting, declared once (flags, specs, names, JSON)
    scheme.py             Scheme: one plan x stage settings, its presets, checks and JSON
    request.py            SchemeRequest: what a user asks of a checkpoint, resolved into a Scheme
    sampler.py            the stage loop that runs a Scheme on a model
    stage_updates.py      the loop's two update rules: ours, and Diffusion Forcing's (stabilization "df")
    df_step.py            Diffusion Forcing's per-frame update and context display
    guidance.py           conditions and classifier-free guidance around the network
    kv_cache.py           causal rollouts reuse the activations of unchanged earlier frames
    mcmc.py               MCMC refinement with an energy model (energy descent or Langevin + Metropolis)
    condition_sources.py  where a run's conditions come from (dataset actions, a file, a label, null)
    run.py                sampling a dataset's test videos into a results folder (video_sample.py)
    describe.py           a Scheme shown without a model (video_schedule.py)
    plan_picture.py       a plan drawn as FDM's figure
"""
