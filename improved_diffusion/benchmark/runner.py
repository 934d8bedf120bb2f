"""Runner: one variant's models, optimizer and measured calls (forward, training step, two rollouts).

Each call is one timed unit of work; a measure that fails is recorded and dropped, so the other
variants and measures still get their numbers.
"""

import dataclasses
import time

import torch

from ..models.build import ModelConfig, create_model
from ..precision import PrecisionModel, compile_model
from ..sampling.kv_cache import CausalCache
from ..sampling.sampler import one_video_at_a_time, sample_video, video_generator
from .configs import VARIANTS
from .memory import peak_memory_growth, synchronize


class Runner:
    """One variant's models, optimizer and calls, each call being one measured unit of work."""

    def __init__(self, name, bench, state, device, work):
        self.name = name
        self.variant = v = VARIANTS[name]
        self.device = device
        self.work = work
        self.note = None  # what the table's notes say about this variant besides its description
        self.unavailable = None  # "not available": the variant cannot run here, its cells say so
        self.last_cache = None
        self.failed = {}  # measure -> the error that stopped it
        cfg = ModelConfig(**bench.model, use_checkpoint=v.checkpoint)
        self.model = self.build(cfg, state)
        self.net = PrecisionModel(compile_model(self.model) if v.compile else self.model, v.precision, device)
        # Training compiles with static shapes, as the train loop does (precision.compile_model).
        self.train_net = PrecisionModel(compile_model(self.model, dynamic=False) if v.compile else self.model,
                                        v.precision, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type) if v.precision == "fp16" else None
        self.causal_model = self.causal_net = self.cache_class = None
        if "stabilized" in v.measures:
            self.causal_model = causal = self.build(dataclasses.replace(cfg, causal=True), state)
            self.causal_net = PrecisionModel(compile_model(causal) if v.compile else causal, v.precision, device)
        if v.kv_cache:
            self.cache_class = CausalCache
        self.measures = () if self.unavailable else v.measures

    def build(self, cfg, state):
        model = create_model(cfg).to(self.device)
        model.load_state_dict(state)
        return model

    def forward(self):
        b = self.work["batch"]
        with torch.no_grad():
            self.work["train_diffusion"].call_model(self.net, b["x_t"], b["t"], b["kwargs"])

    def train(self):
        b = self.work["batch"]
        self.opt.zero_grad(set_to_none=True)
        terms = self.work["train_diffusion"].training_losses(self.train_net, b["x"], b["t"], b["kwargs"], noise=b["noise"],
                                                             latent_mask=b["loss_mask"])
        loss = terms["loss"].mean()
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def sampler_model(self, causal):
        if self.cache_class is not None:
            self.last_cache = self.cache_class(self.causal_model)  # a fresh cache per rollout
            return self.last_cache
        model = self.causal_net if causal else self.net
        return one_video_at_a_time(model) if self.variant.per_video else model

    def rollout(self, scheme_name):
        scheme = self.work["schemes"][scheme_name]
        videos = self.work["videos"]
        generators = [video_generator(0, 0, b) for b in range(len(videos))]
        sample_video(self.sampler_model(scheme_name == "stabilized"), self.work["sample_diffusion"], videos,
                     scheme.n_obs, scheme.make_plan(), scheme.stage, generators)

    def run(self, measure):
        """Run one unit of `measure`; returns its wall time in seconds (the device synchronized)."""
        call = {"forward": self.forward, "train": self.train, "autoreg": lambda: self.rollout("autoreg"),
                "stabilized": lambda: self.rollout("stabilized")}[measure]
        synchronize(self.device)
        start = time.perf_counter()
        call()
        synchronize(self.device)
        return time.perf_counter() - start

    def fail(self, measure, error):
        """Stop measuring `measure` after `error`: its cells say "failed", the notes say why."""
        lines = str(error).strip().splitlines()
        self.failed[measure] = f"{type(error).__name__}: {lines[0] if lines else ''}"
        self.measures = tuple(m for m in self.measures if m != measure)

    def train_memory(self):
        """(bytes, method): peak memory growth of one untimed training step; gradients are freed first."""
        self.opt.zero_grad(set_to_none=True)
        return peak_memory_growth(self.train, self.device)
