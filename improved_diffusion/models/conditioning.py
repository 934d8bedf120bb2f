"""Conditioning inputs of both networks: per-frame vectors (actions) and per-video class labels.

Where they enter: each frame's noise-level (time) embedding. An MLP of the frame's vector and a
row of a label embedding table are added to it, so the condition reaches every residual block's
scale-shift (and, in FDM's UNet, the relative-position networks of temporal attention) exactly as
the noise level does. This is how class labels enter DiT (Peebles & Xie 2023, `LabelEmbedder`:
class embedding + timestep embedding) and improved/guided diffusion (`label_emb`). Diffusion
Forcing's 3D-UNet refuses `external_cond_dim` (NotImplementedError in its unet3d.py); its
Transformer concatenates the per-frame condition to the per-frame input of its first linear layer
together with the noise-level embedding (models/transformer.py, `init_mlp`), which is a learned
linear map of the condition added to one of the noise level: the same per-frame additive design.

A frame's vector travels with the frame: slot k of a call holds frame `frame_indices[b, k]` and
its vector `cond[b, k]` (the action taken at that frame; data/actions.py), whichever frames a plan
puts together.

The null condition (classifier-free guidance, Ho & Salimans 2022): a model built with
`null_cond=True` has a learned null embedding per conditioning input, a vector replacing the
action MLP's output and an extra row (index num_classes) of the label table, as DiT's
`use_cfg_embedding`. `drop_cond` [B] bool replaces every condition of those videos by the null
ones, so their output does not depend on the dropped inputs at all. The replacement uses
torch.where over both branches, so every conditioning parameter takes part in every call (DDP
needs no unused-parameter search). A model without null embeddings must be given its conditions.
"""

import torch
import torch.nn as nn


class ConditionEmbedding(nn.Module):
    """[B x T x emb_dim] to add to each frame's time embedding, from cond [B x T x D] and y [B]."""

    def __init__(self, emb_dim, cond_dim=0, num_classes=0, null_cond=False):
        super().__init__()
        if cond_dim < 0 or num_classes < 0 or not (cond_dim or num_classes):
            raise ValueError(f"a condition embedding needs cond_dim > 0 or num_classes > 0, got {cond_dim}, "
                             f"{num_classes}.")
        self.cond_dim = cond_dim
        self.num_classes = num_classes
        self.null_cond = null_cond
        if cond_dim:
            self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if null_cond:
                self.null_cond_emb = nn.Parameter(torch.zeros(emb_dim))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes + int(null_cond), emb_dim)  # row num_classes: null

    def forward(self, B, T, cond=None, y=None, drop_cond=None):
        """The embedding of each frame's conditions; a missing input means the null condition."""
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        if drop_cond is None:
            drop = torch.zeros(B, dtype=torch.bool, device=device)
        else:
            drop = torch.as_tensor(drop_cond, device=device).bool().reshape(B)
        if not self.null_cond and (drop.any() or (self.cond_dim and cond is None)
                                   or (self.num_classes and y is None)):
            raise ValueError("this model has no null condition (it was trained with cond_drop_prob 0): give it "
                             "every condition (cond= for per-frame vectors, y= for labels) and no drop_cond.")
        emb = 0
        if self.cond_dim:
            if cond is None:
                vectors = self.null_cond_emb.expand(B, T, -1)
            else:
                if tuple(cond.shape) != (B, T, self.cond_dim):
                    raise ValueError(f"cond must be [B x T x {self.cond_dim}] = {[B, T, self.cond_dim]}, "
                                     f"got {list(cond.shape)}.")
                vectors = self.cond_mlp(cond.to(device, dtype))
                if self.null_cond:
                    vectors = torch.where(drop.view(B, 1, 1), self.null_cond_emb.to(vectors.dtype), vectors)
            emb = emb + vectors
        if self.num_classes:
            if y is None:
                labels = torch.full((B,), self.num_classes, dtype=torch.long, device=device)
            else:
                labels = torch.as_tensor(y, device=device).long().reshape(B)
                if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                    raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}.")
                if self.null_cond:
                    labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            emb = emb + self.label_emb(labels)[:, None, :]
        return emb.expand(B, T, -1)
