"""Stable Diffusion's UNet compiled by `torch.compile` (Inductor), at load, for the sizes a
worker warms.

Compiling takes a minute or more on a GPU host, so it happens only while the worker loads
(never billed), and a request only ever uses what was compiled then: each batch runs under the
compiler's `eager_on_recompile` stance (`workers.engines.device.serving`), so a batch the
compiled graph does not cover (a size not warmed, say) runs eagerly, as it would uncompiled,
instead of compiling on a tenant's time. The guards that decide this are the compiler's own:
a graph is used only where it computes what the eager UNet would. (LoRA adapters are fused
into the weights rather than added as layers, `sd_adapters`, so that the graph covers their
batches too.)
"""

import torch
from diffusers import UNet2DConditionModel


def compile_unet(unet: UNet2DConditionModel) -> None:
    """Compile `unet`'s forward in place: the pipelines that share the module share the
    compiled code, and adapters are still loaded into (and unloaded from) the module itself.
    Nothing is compiled until the first call; the weights are the graph's inputs, so changed
    values (a fused adapter) need no new graph."""
    compiled = torch.compile(unet.forward)

    def forward(sample: torch.Tensor, timestep, *args, **kwargs):
        # DDIM and DPM++ give the UNet integer timesteps, Euler float ones; the UNet embeds
        # either the same way (as floats), so one graph serves every scheduler.
        if torch.is_tensor(timestep):
            timestep = timestep.float()
        # The batch (images x 2 with guidance) changes from call to call: one graph for all.
        torch._dynamo.maybe_mark_dynamic(sample, 0)
        hidden = kwargs.get("encoder_hidden_states")
        if hidden is not None:
            torch._dynamo.maybe_mark_dynamic(hidden, 0)
        return compiled(sample, timestep, *args, **kwargs)

    unet.forward = forward


def uncompile_unet(unet: UNet2DConditionModel) -> None:
    """Undo `compile_unet`: the module's own forward again."""
    del unet.forward
