"""TrainConfig: every training flag, declared once with its default and help, and the checks of its values.

scripts/video_train.py turns the fields into flags and a run saves them in its config.json.
`TrainConfig.validate` refuses values training cannot run with, in one sentence naming the flag,
before any file is read (the measurement flags through validation.check_measurements).
"""

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..precision import check_precision
from .frame_masks import NOISE_MODES
from .timestep_sampler import SCHEDULE_SAMPLERS
from .validation import check_measurements


@dataclass
class TrainConfig:
    """FDM's training flags with FDM's defaults (scripts/video_train.py), then ours."""

    dataset: str = ""  # required: a registered name or a folder of videos
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment (see timestep_sampler)
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0  # linear decay of lr to 0 at this step (0: constant)
    batch_size: int = 1  # per rank: the effective batch is batch_size x number of ranks
    microbatch: int = -1  # <= 0: no gradient accumulation
    ema_rate: str = "0.9999"  # comma-separated list
    log_interval: int = 10
    save_interval: int = 50000
    resume_checkpoint: str = ""  # start a new run from these weights (FDM's meaning)
    use_fp16: bool = False  # FDM's flag: True means --precision fp16
    fp16_scale_growth: float = 1e-3  # fp16 loss scale growth per step (FDM's, in log2 units), see grad_scaler
    resume_id: str = ""  # FDM's spelling of --wandb_id
    num_workers: int = -1  # threads reading videos; -1: number of cores - 1 (FDM's rule)
    pad_with_random_frames: bool = True
    max_frames: int = 20
    T: int = -1  # video length to train on; -1: the dataset's default
    sample_interval: int = 50000  # <= 0: no previews
    preview_mcmc_steps: int = 0  # energy models: MCMC steps in previews, logging preview_mcmc_acceptance
    noise_mode: str = "fdm"  # fdm | diffusion_forcing | mixed
    max_steps: int = 0  # stop after this many steps (0: run forever, or until lr_anneal_steps)
    seed: int = 0
    checkpoint_dir: str = "checkpoints"
    wandb_id: str = ""  # resume this run
    keep_last: int = 0  # keep only the newest K checkpoint steps (0: keep all)
    max_nonfinite_steps: int = 20  # stop after this many consecutive non-finite losses
    on_bad_video: str = "stop"  # stop | skip: what an unreadable or malformed video does to training
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (0: none), see lr_at
    adam_betas: str = "0.9,0.999"  # AdamW's (beta1, beta2); Diffusion Forcing's video recipe uses 0.9,0.99
    grad_clip: float = 0.0  # clip the gradient's global 2-norm to this (0: no clipping)
    precision: str = field(default="fp32", metadata={"help": (
        "the network's forward runs in this precision (autocast); weights, optimizer state, EMAs and "
        "checkpoints stay float32; fp16 also scales the loss (FDM's --use_fp16 True means fp16)")})
    compile: bool = field(default=False, metadata={"help": (
        "train through torch.compile(network) (the first steps compile; checkpoints are unchanged)")})
    frame_skip: int = field(default=1, metadata={"help": (
        "keep every k-th frame of the dataset's videos, with the action of each kept frame (dmlab and minecraft, "
        "as Diffusion Forcing; the default --T becomes the episode length // k)")})
    val_interval: int = field(default=0, metadata={"help": (
        "every N steps, log val_loss: the EMA model's diffusion loss on --val_videos fixed test clips, with fixed "
        "frame masks, timesteps and noise, so curves compare across steps and resumes (0: off)")})
    val_videos: int = field(default=16, metadata={"help": (
        "test clips in the validation set (split across ranks); part of what val_loss means, so a resumed run "
        "keeps its own")})
    eval_interval: int = field(default=0, metadata={"help": (
        "every N steps, sample --eval_videos test videos from the EMA model with --eval_scheme and log their "
        "metrics (eval_psnr, eval_ssim, ...) and videos, written to <run dir>/evals/step<N>/ (0: off)")})
    eval_videos: int = field(default=8, metadata={"help": "test videos sampled at each evaluation"})
    eval_scheme: str = field(default="autoreg", metadata={"help": "the sampling scheme of evaluations (any registered name)"})
    eval_T: int = field(default=-1, metadata={"help": (
        "length of the videos sampled at evaluations (-1: min(2 x max_frames, T))")})
    eval_respacing: str = field(default="ddim25", metadata={"help": (
        "timestep respacing of evaluation sampling (DDIM, as previews; '' samples the whole chain)")})
    eval_i3d_path: str = field(default="", metadata={"help": (
        "the I3D TorchScript file FVD needs (StyleGAN-V's i3d_torchscript.pt): evaluations then also log eval_fvd "
        "between the sampled and the true test videos (needs --eval_videos 2 or more); empty: no FVD")})
    keep_best: str = field(default="", metadata={"help": (
        "also keep the EMA checkpoint with the best value of this figure as <run dir>/best_<figure>.pt: val_loss "
        "(or val_loss_q0..3; lower is better, needs --val_interval) or an eval figure such as eval_psnr, eval_ssim "
        "(needs --eval_interval); empty: off")})

    def validate(self):
        """Raise ConfigError naming the first flag that training cannot run with (cheap: no files read).

        T == -1 (the dataset's length) must be resolved before max_frames is compared with it.
        """
        if not self.dataset:
            raise ConfigError("--dataset is required: a registered dataset name or a folder of videos.")
        for name in ("batch_size", "log_interval", "save_interval", "max_frames", "max_nonfinite_steps", "frame_skip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("lr_anneal_steps", "max_steps", "keep_last", "seed", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 or positive, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight_decay must be 0 or positive, got {self.weight_decay}.")
        parse_ema_rates(self.ema_rate)
        parse_adam_betas(self.adam_betas)
        if not self.grad_clip >= 0:
            raise ConfigError(f"--grad_clip must be 0 (no clipping) or positive, got {self.grad_clip}.")
        if self.T != -1 and self.T < 1:
            raise ConfigError(f"--T must be -1 (the dataset's length) or positive, got {self.T}.")
        if self.T != -1 and self.max_frames > self.T:
            raise ConfigError(f"--max_frames {self.max_frames} is larger than --T {self.T}: "
                              f"an example cannot hold more frames than its video has.")
        if self.num_workers < -1:
            raise ConfigError(f"--num_workers must be -1 (cores - 1) or at least 0, got {self.num_workers}.")
        check_precision(self.precision)
        if self.use_fp16 and self.precision not in ("fp16", "fp32"):
            raise ConfigError(f"--use_fp16 True means --precision fp16, which contradicts --precision "
                              f"{self.precision}: give only one of them.")
        if not self.fp16_scale_growth >= 0:
            raise ConfigError(f"--fp16_scale_growth must be 0 or positive, got {self.fp16_scale_growth}.")
        for name, allowed in (("noise_mode", NOISE_MODES), ("schedule_sampler", SCHEDULE_SAMPLERS),
                              ("on_bad_video", ON_BAD_VIDEO)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'.")
        for name in ("val_interval", "eval_interval", "preview_mcmc_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 (off) or positive, got {getattr(self, name)}.")
        for name in ("val_videos", "eval_videos"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.eval_T != -1 and self.eval_T < 2:
            raise ConfigError(f"--eval_T must be -1 (min(2 x max_frames, T)) or at least 2, got {self.eval_T}.")
        check_measurements(self)

    def training_precision(self):
        """The precision training runs in: FDM's --use_fp16 True is --precision fp16."""
        return "fp16" if self.use_fp16 else self.precision


ON_BAD_VIDEO = ("stop", "skip")


def parse_ema_rates(text):
    """--ema_rate as a list of floats, each in (0, 1)."""
    try:
        rates = [float(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--ema_rate must be comma-separated numbers, got '{text}'.") from None
    if not rates or not all(0 < r < 1 for r in rates):
        raise ConfigError(f"--ema_rate must be one or more rates in (0, 1), got '{text}'.")
    return rates


def parse_adam_betas(text):
    """--adam_betas as (beta1, beta2), each in [0, 1)."""
    try:
        betas = tuple(float(b) for b in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--adam_betas must be two comma-separated numbers, got '{text}'.") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"--adam_betas must be two numbers in [0, 1) such as 0.9,0.999, got '{text}'.")
    return betas
