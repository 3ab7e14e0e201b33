"""What one training step computes: condition dropout, the epoch's sample order, and the denoising loss.

    drop_text, drop_image = drop_masks(B, generator)      # IP-Adapter's recipe: text 5%, image 5%, both 5%
    batch = make_batch(features, rows, generator)         # cached rows, dropped out
    loss = diffusion_loss(unet, scheduler, batch, generator, scaling_factor)

The loss is Stable Diffusion's: sample a latent from the cached VAE distribution, add noise at a random
timestep, and ask the UNet (with the adapter) to predict that noise, with the same UNet call the sampling
pipeline makes. helpers.train runs it in a loop with Accelerate.
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


def diffusion_loss(unet, scheduler, batch: dict, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """The denoising loss of one batch (the same UNet call as sampling: text states plus image features
    through `added_cond_kwargs["image_embeds"]`).

    batch: latent_mean, latent_std (B,4,h,w); text_embeds (B,77,C); image_embeds (B,257,1280), already
    dropped out where needed. Noise and timesteps come from `generator` (CPU), so a step is reproducible.
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
    return F.mse_loss(pred.float(), target.float())
