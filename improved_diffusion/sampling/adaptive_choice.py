"""How FDM's adaptive plans choose observed frames: farthest-first by embedding distance (LPIPS or thumbnails).

`Adaptive` is the mixin that plans.py's AdaptiveAutoregressive and AdaptiveHierarchy put in front of
their non-adaptive plan (FDM's AdaptiveSamplingSchemeBase): per video, the observed frames of a stage
are chosen from the known ones greedily, each the farthest from those already chosen. Frames are
embedded with LPIPS's AlexNet as FDM does when the optional `lpips` package and its weights load,
otherwise with an 8x8 thumbnail (`pixel_embedding`); the plan logs which.
"""

import logging
import math

import numpy as np
import torch

from ..errors import PlanError

logger = logging.getLogger(__name__)


def pixel_embedding(frames, size=8):
    """Built-in frame embedding needing no download: an area-averaged size x size thumbnail.

    frames: [N x C x H x W] in [-1, 1]. Scaled so that the squared distance between two embeddings
    is the mean squared difference of the thumbnails.
    """
    thumbs = torch.nn.functional.adaptive_avg_pool2d(frames.float(), size)
    return thumbs.flatten(1) / math.sqrt(thumbs[0].numel())


def _load_lpips_embedding():
    """FDM's embedding: features of lpips' AlexNet such that squared distance equals LPIPS distance.

    Each layer's unit-normalised features are scaled by the square root of lpips' linear weights and
    by 1/sqrt(H*W), so summing squared differences reproduces lpips' weighted spatial mean.
    Raises if the lpips package or its (downloaded) AlexNet weights are unavailable.
    """
    import lpips  # optional dependency, imported only when an adaptive plan needs it

    model = lpips.LPIPS(net="alex", spatial=False).eval()

    @torch.no_grad()
    def embed(frames):
        model.to(frames.device)
        feats = model.net.forward(model.scaling_layer(frames.float()))
        parts = []
        for k in range(model.L):
            f = lpips.normalize_tensor(feats[k])
            weight = model.lins[k].model[-1].weight  # [1 x C x 1 x 1]
            parts.append((weight.sqrt() * f).flatten(1) / math.sqrt(f.shape[-2] * f.shape[-1]))
        return torch.cat(parts, dim=1)

    return embed


def _farthest_first(embs, n, forced):
    """Greedy farthest-point choice of n rows of embs [P x D], as FDM's select_obs_indices.

    Starts with forced[0]; step k takes forced[k] while forced positions remain, otherwise the row
    whose squared distance to the nearest chosen row is largest (first such row on ties). When n
    exceeds P, rows repeat, as in the reference.
    """
    chosen = [forced[0]]
    nearest = torch.full((embs.shape[0],), math.inf, dtype=torch.float64)
    for k in range(1, n):
        dist = ((embs - embs[chosen[-1]]) ** 2).sum(dim=1).double().cpu()
        nearest = torch.minimum(nearest, dist)
        chosen.append(forced[k] if k < len(forced) else int(np.argmax(nearest.numpy())))
    return chosen


class Adaptive:
    """Mixin for FDM's adaptive plans: observed frames chosen per video by embedding distance.

    `next_stage(videos)` needs the current samples [B x T x C x H x W]; its Stage holds one obs list
    per video and B copies of the latent list, as FDM's AdaptiveSamplingSchemeBase returns them.
    Frames are embedded with LPIPS (AlexNet) like FDM when the optional `lpips` package and its
    weights load, otherwise with `pixel_embedding`; `embedding_name` says which. Pass `embedder`
    (frames [N x C x H x W] -> [N x D]) to use another embedding.

    Differences from the reference: candidates are considered in sorted order rather than a set's
    iteration order (this only changes tie-breaking), and an optimal schedule is rejected instead of
    being silently ignored.
    """

    adaptive = True

    def __init__(self, *args, embedder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.videos = None  # the videos of the stage being planned
        self._embedder = embedder
        self._embedding_name = None if embedder is None else "custom"

    @property
    def embedding_name(self):
        """Which embedding ranks frames: 'lpips-alex', 'pixels-8x8' or 'custom'."""
        if self._embedder is None:
            self._choose_embedder()
        return self._embedding_name

    def _choose_embedder(self):
        channels = None if self.videos is None else self.videos.shape[2]
        try:
            if channels not in (None, 3):
                raise ValueError(f"LPIPS needs RGB frames, got {channels} channels")
            self._embedder, self._embedding_name = _load_lpips_embedding(), "lpips-alex"
            logger.info("%s ranks frames by LPIPS (AlexNet) distance.", self.name)
        except Exception as e:  # missing package, missing weights, no network, non-RGB frames
            self._embedder, self._embedding_name = pixel_embedding, "pixels-8x8"
            logger.warning("%s ranks frames by 8x8 thumbnail distance because LPIPS is unavailable (%s).",
                           self.name, str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _embed(self, frames):
        """[B x P] frames of the current videos -> [B x P x D] embeddings."""
        if self._embedder is None:
            self._choose_embedder()
        x = self.videos[:, frames]
        B, P = x.shape[:2]
        with torch.no_grad():  # in chunks, so long videos do not exhaust memory
            embs = torch.cat([self._embedder(chunk) for chunk in x.reshape(B * P, *x.shape[2:]).split(256)])
        return embs.reshape(B, P, -1)

    def _select_obs(self, candidates, n, forced):
        """One list of n frames per video: forced frames first, then farthest-first by embedding."""
        embs = self._embed(candidates)
        position = {frame: p for p, frame in enumerate(candidates)}
        forced = [position[i] for i in forced]
        return [[candidates[p] for p in _farthest_first(embs[b], n, forced)] for b in range(len(embs))]

    def next_stage(self, videos=None):
        if videos is None:
            raise PlanError(f"{self.name} chooses observed frames from the videos, so next_stage needs them.")
        self.videos = videos
        return super().next_stage(videos)

    def _observed_and_latent(self, videos, B):
        return self.next_indices()
