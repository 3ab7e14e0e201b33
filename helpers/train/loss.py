"""What one training step computes: condition dropout, the epoch's sample order, and the denoising loss.

    drop_text, drop_image = drop_masks(B, generator)      # IP-Adapter's recipe: text 5%, image 5%, both 5%
    batch = make_batch(features, rows, generator)         # cached rows, dropped out
    loss = diffusion_loss(unet, scheduler, batch, generator, scaling_factor)
    loss = masked_mse(pred, target, mask, background_weight)   # MASK loss / both: the character weighs most

The loss is Stable Diffusion's: sample a latent from the cached VAE distribution, add noise at a random
timestep, and ask the UNet (with the adapter) to predict that noise, with the same UNet call the sampling
pipeline makes. helpers.train runs it in a loop with Accelerate. With a mask on the loss (helpers.train.masking)
the squared error is weighted by the target's character mask at latent size, m (0 to 1 per latent pixel):

    w = m + b (1 - m)        loss_i = sum_{c,y,x} w (eps - eps_hat)^2 / sum_{c,y,x} w        loss = mean_i loss_i

b, the background weight (profile.mask_background_weight, 0.1), keeps the background trained a little; each
sample is normalised by its own weight (ELITE's area normalisation), so a small character weighs as much as a
large one, and w = 1 everywhere gives the plain mean squared error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DROP_RATES = {"text": 0.05, "image": 0.05, "both": 0.05}  # IP-Adapter's training recipe


def drop_masks(n: int, generator: torch.Generator, rates=DROP_RATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which their image: one draw per sample, so the three cases
    (text only, image only, both) are exclusive, with the given rates. Returns two bool tensors (n,)."""
    r = torch.rand(n, generator=generator)
    t, i, b = rates["text"], rates["image"], rates["both"]
    drop_text = (r < t) | ((r >= t + i) & (r < t + i + b))
    drop_image = ((r >= t) & (r < t + i + b))
    return drop_text, drop_image


def epoch_order(n: int, epoch: int, seed: int, global_batch: int) -> torch.Tensor:
    """The sample order of one epoch, padded by wrap-around to a multiple of the global batch."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    pad = (-n) % global_batch
    return torch.cat([perm, perm[:pad]]) if pad else perm


def make_batch(features: dict[str, torch.Tensor], rows: torch.Tensor, generator: torch.Generator,
               references: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The rows of the feature cache (helpers.data.features) as one training batch, with the conditions dropped
    out (drop_masks, drawn from `generator`): a dropped text becomes the empty prompt's states, a dropped image
    the features of a zero image.

    references: (B, 257, 1280) the image features to condition on (helpers.train.pairing); None: the rows' own
    returns latent_mean, latent_std (B, 4, r/8, r/8); text_embeds (B, 77, C); image_embeds (B, 257, 1280)
    """
    drop_text, drop_image = drop_masks(len(rows), generator)
    image = features["image_embeds"][rows] if references is None else references
    return {
        "latent_mean": features["latent_mean"][rows],
        "latent_std": features["latent_std"][rows],
        "text_embeds": torch.where(drop_text[:, None, None], features["null_text_embeds"], features["text_embeds"][rows]),
        "image_embeds": torch.where(drop_image[:, None, None], features["null_image_embeds"], image),
    }


def loss_weights(mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """w = m + b (1 - m): the weight of each latent pixel, mask (B, h, w) in [0, 1] -> (B, h, w) in [b, 1]."""
    return mask + background_weight * (1 - mask)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """The squared error weighted by the mask (module docstring), in fp32: pred, target (B, C, h, w); mask
    (B, h, w), the share of each latent pixel on the character; background_weight b in (0, 1]. Per sample
    sum(w (pred - target)^2) / sum(w) over channels and pixels, then the mean over the batch."""
    if background_weight is None or not 0 < background_weight <= 1:
        raise ValueError(f"the mask's background weight must lie in (0, 1], got {background_weight!r} "
                         "(profile.mask_background_weight; 0 would leave the background untrained)")
    w = loss_weights(mask.float(), background_weight)[:, None].expand(pred.shape)  # (B, C, h, w): every channel
    err = (pred.float() - target.float()) ** 2
    return ((w * err).flatten(1).sum(1) / w.flatten(1).sum(1)).mean()


def diffusion_loss(unet, scheduler, batch: dict, generator: torch.Generator, scaling_factor: float, *,
                   background_weight: float | None = None) -> torch.Tensor:
    """The denoising loss of one batch (the same UNet call as sampling: text states plus image features
    through `added_cond_kwargs["image_embeds"]`).

    batch: latent_mean, latent_std (B,4,h,w); text_embeds (B,77,C); image_embeds (B,257,1280), already
    dropped out where needed; optional latent_mask (B,h,w), the targets' character masks at latent size
    (MASK loss or both): then the loss is masked_mse with `background_weight`, else the plain mean squared
    error. Noise and timesteps come from `generator` (CPU), so a step is reproducible.
    """
    mean, std = batch["latent_mean"], batch["latent_std"]
    device = mean.device
    eps_latent = torch.randn(mean.shape, generator=generator).to(device)
    latents = (mean.float() + std.float() * eps_latent) * scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    weight_dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    pred = unet(noisy.to(weight_dtype), t, encoder_hidden_states=batch["text_embeds"].to(weight_dtype),
                added_cond_kwargs={"image_embeds": [batch["image_embeds"].to(weight_dtype)[:, None]]}).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    if "latent_mask" in batch:
        return masked_mse(pred, target, batch["latent_mask"], background_weight)
    return F.mse_loss(pred.float(), target.float())
