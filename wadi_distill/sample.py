"""Sampling from a teacher: the multi-step sampler with classifier-free guidance (CFG).

CFG mixes the conditional and the null-prompt prediction, ``out = out_null + cfg · (out_cond − out_null)``. On a
variance-preserving schedule the teacher predicts ε and a deterministic DDIM scheduler (η = 0) built from the
teacher's own noise-schedule config walks from pure noise to an image in ``steps`` steps; on a flow-matching
schedule the teacher predicts the velocity and diffusers' ``FlowMatchEulerDiscreteScheduler`` with the teacher's
shift takes Euler steps from σ = 1 to σ = 0 (guidance on the velocity is guidance on ε: the two are affine in
each other with the same coefficients for both prompts).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from wadi_distill.schedules import FlowMatchSchedule, classifier_free_guidance, schedule_from_scheduler
from wadi_probe.errors import WadiInputError


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    return _tracked(iterable, description)


def _tracked(iterable, description: str):
    from wadi_probe.console import progress_bar

    with progress_bar(description, transient=True) as bar:
        yield from bar.track(iterable)


def multistep_scheduler(scheduler, steps: int, device: torch.device | str, image_tokens: int | None = None):
    """The sampler's diffusers scheduler for a teacher's ``scheduler``, with ``steps`` timesteps set.

    VP: DDIM (η = 0) from its config. Flow: ``FlowMatchEulerDiscreteScheduler`` with the teacher's shift (a
    multistep flow scheduler's ``flow_shift``; a dynamic shift resolved for ``image_tokens`` latent tokens) over
    ``u = 1, 1 − 1/steps, …, 1/steps`` shifted, then σ = 0, as Flux's pipeline sets it (the scheduler's default grid
    ends its u at the shifted 1/1000 instead); its timesteps, which the denoiser gets, are σ·num_train_timesteps.
    """
    schedule = schedule_from_scheduler(scheduler)
    if not isinstance(schedule, FlowMatchSchedule):
        sampler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
        sampler.set_timesteps(steps, device=device)
        return sampler
    if schedule.use_dynamic_shifting and image_tokens is not None:
        schedule = schedule.with_image_tokens(image_tokens)
    if schedule.use_dynamic_shifting:
        raise WadiInputError("The teacher's scheduler shifts its timesteps with the image size (use_dynamic_shifting); "
                             "the multi-step sampler needs the teacher's image_tokens to resolve it.")
    sampler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift)
    sampler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), device=device)
    return sampler


@torch.no_grad()
def sample_multistep(teacher, prompts: list[str], steps: int = 50, cfg: float = 2.0,
                     generator: torch.Generator | None = None, *, batch_size: int = 512, clamp: bool = True,
                     progress: bool = False) -> torch.Tensor:
    """Draw one image per prompt with ``steps`` DDIM (VP) or Euler (flow) steps and CFG scale ``cfg``; returns
    (B, C, H, W) in [-1, 1].

    ``teacher`` is a :class:`~wadi_distill.builtin.digits.model.DigitsModel` (anything with ``.unet``, ``.scheduler``,
    ``.encode_prompts``, ``.image_size``, ``.channels``); its denoiser is called with the sampler's timesteps
    (:func:`multistep_scheduler`; a flow teacher with a dynamic shift also has ``.image_tokens``). Noise is drawn from ``generator`` (on its device), so the same seed gives the
    same images; ``cfg = 1`` skips the null-prompt pass.
    """
    if steps < 1:
        raise WadiInputError(f"The number of sampling steps must be at least 1, not {steps}.")
    if len(prompts) == 0:
        raise WadiInputError("Give at least one prompt to sample.")
    device = next(teacher.unet.parameters()).device
    dtype = teacher.unet.dtype
    scheduler = multistep_scheduler(teacher.scheduler, steps, device, getattr(teacher, "image_tokens", None))
    step_options = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
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
            out = teacher.unet(model_in, t, encoder_hidden_states=embeddings).sample
            if guided:
                out_null, out_cond = out.chunk(2)
                out = classifier_free_guidance(out_cond, out_null, cfg)
            x = scheduler.step(out, t, x, **step_options).prev_sample
        chunks.append(x.float())
    images = torch.cat(chunks)
    return images.clamp(-1.0, 1.0) if clamp else images
