"""``AsynDMFlowMatchEulerScheduler``: SD3 / SD3.5's flow-matching Euler steps, per image token.

The flow counterpart of :mod:`asyndm.schedulers` (same :class:`~asyndm.schedulers.AsynRun`,
same step skeleton): every image token (a ``p x p`` patch of latent pixels) has its own
state on the linear ladder of :class:`asyndm.flow.FlowPlan`, read as a sigma and a network
timestep of the scheduler's own shifted schedule (:meth:`FlowPlan.lookup`). Every token
starts at pure noise, so nothing lags at step 0; a run whose masks stay empty calls the
parent's ``step`` at every step.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .flow import FlowPlan, flow_step, upsample_tokens
from .schedulers import _PerPixelScheduler, _step_like
from .state import PixelState
from .step import StepOutput


class AsynDMFlowMatchEulerScheduler(_PerPixelScheduler, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with per-token sigmas."""

    step = _step_like(FlowMatchEulerDiscreteScheduler.step)
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteSchedulerOutput as _output_cls)

    def set_timesteps(self, *args, **kwargs):
        return _PerPixelScheduler.set_timesteps(self, *args, **kwargs)

    # diffusers' retrieve_timesteps passes sigmas= (as Flux's pipeline does) only to a
    # set_timesteps whose signature names it
    set_timesteps.__signature__ = inspect.signature(FlowMatchEulerDiscreteScheduler.set_timesteps)

    def _new_plan(self, curve: str, start: int) -> FlowPlan:
        if self.config.stochastic_sampling:
            raise ValueError("AsynDM takes deterministic flow steps (stochastic_sampling=False)")
        return FlowPlan.from_sigmas(self.sigmas[start:], self.timesteps[start:], curve,
                                    int(self.config.num_train_timesteps))

    def asyndm_maps(self, st: PixelState, nxt: torch.Tensor, rounded=None):
        """Float ``(B, h, w)`` token maps of network timesteps (``sigma * T``; ``0`` = clean)."""
        plan = self.asyndm_run.plan
        return plan.lookup(st.state)[1], plan.lookup(nxt)[1]

    def asyndm_model_timesteps(self, st: PixelState) -> torch.Tensor:
        """``(B, h, w)`` float32 network timestep of every token at this step."""
        return self.asyndm_run.plan.lookup(st.state)[1]

    def _sigma(self, state: torch.Tensor) -> torch.Tensor:
        """Per-token sigma upsampled to the latents, ``(B, 1, H, W)``, or ``(B, N, 1)`` for
        packed latents (Flux: token ``n = row * w + col``)."""
        run = self.asyndm_run
        sigma = run.plan.lookup(state)[0]  # (B, h, w)
        if run.token_grid is not None:  # packed (B, N, C) latents
            return sigma.flatten(1)[:, :, None]  # (B, N, 1)
        return upsample_tokens(sigma, run.patch_size)

    def _pixel_step(self, model_output, timestep, sample, st, nxt, t_map, t_next_map,
                    a: dict) -> StepOutput:
        if self.step_index is None:
            self._init_step_index(timestep)
        prev, x0 = flow_step(model_output, sample, self._sigma(st.state), self._sigma(nxt))
        self._step_index += 1
        return StepOutput(prev_sample=prev, pred_original_sample=x0)

    def _x0(self, model_output, sample, st) -> torch.Tensor:
        sigma = self.sigmas[self.step_index - 1].to(sample.device)
        return sample.to(torch.float32) - sigma * model_output

    def _output(self, res: StepOutput, return_dict: bool):
        if not return_dict:
            return (res.prev_sample,)
        return self._output_cls(prev_sample=res.prev_sample)

    def scale_noise(self, sample, timestep, noise=None):
        run = self.asyndm_run
        if run is not None and run.pixels is None:
            run.entered = True  # img2img: the run starts on the ladder
        return super().scale_noise(sample, timestep, noise)

