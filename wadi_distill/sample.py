"""Sampling from a teacher: the multi-step DDIM sampler with classifier-free guidance (CFG).

The teacher predicts ε; CFG mixes the conditional and the null-prompt prediction,
``ε = ε_null + cfg · (ε_cond − ε_null)``, and a deterministic DDIM scheduler (η = 0) built from the teacher's own
noise-schedule config walks from pure noise to an image in ``steps`` steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from wadi_distill.schedules import classifier_free_guidance
from wadi_probe.errors import WadiInputError


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    return _tracked(iterable, description)


def _tracked(iterable, description: str):
    from wadi_probe.console import progress_bar

    with progress_bar(description, transient=True) as bar:
        yield from bar.track(iterable)


@torch.no_grad()
def sample_multistep(teacher, prompts: list[str], steps: int = 50, cfg: float = 2.0,
                     generator: torch.Generator | None = None, *, batch_size: int = 512, clamp: bool = True,
                     progress: bool = False) -> torch.Tensor:
    """Draw one image per prompt with ``steps`` DDIM steps and CFG scale ``cfg``; returns (B, C, H, W) in [-1, 1].

    ``teacher`` is a :class:`~wadi_distill.builtin.digits.model.DigitsModel` (anything with ``.unet``, ``.scheduler``,
    ``.encode_prompts``, ``.image_size``, ``.channels``). Noise is drawn from ``generator`` (on its device),
    so the same seed gives the same images; ``cfg = 1`` skips the null-prompt pass.
    """
    if steps < 1:
        raise WadiInputError(f"The number of sampling steps must be at least 1, not {steps}.")
    if len(prompts) == 0:
        raise WadiInputError("Give at least one prompt to sample.")
    device = next(teacher.unet.parameters()).device
    dtype = teacher.unet.dtype
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, set_alpha_to_one=False)
    scheduler.set_timesteps(steps, device=device)
    noise_device = generator.device if generator is not None else device
    shape = (len(prompts), teacher.channels, teacher.image_size, teacher.image_size)
    latents = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)

    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start:start + batch_size])
        x = latents[start:start + batch_size].to(dtype)
        cond = teacher.encode_prompts(chunk_prompts)
        guided = cfg != 1.0
        if guided:
            null = teacher.encode_prompts([teacher.null_prompt] * len(chunk_prompts))
            embeddings = torch.cat([null, cond])
        else:
            embeddings = cond
        for t in _progress(scheduler.timesteps, progress, f"sampling ({steps} steps)"):
            model_in = torch.cat([x, x]) if guided else x
            eps = teacher.unet(model_in, t, encoder_hidden_states=embeddings).sample
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = classifier_free_guidance(eps_cond, eps_null, cfg)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        chunks.append(x.float())
    images = torch.cat(chunks)
    return images.clamp(-1.0, 1.0) if clamp else images
