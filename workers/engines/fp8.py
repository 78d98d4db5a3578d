"""Float8 weights for the language model's linear layers (`GPUHOST_LLAVA_WEIGHTS=fp8`).

Decoding one token reads every weight once, so a decode step's time is the weights' bytes over
the memory's bandwidth: in float8 (e4m3) the language model's layers are half their bf16
bytes. Each layer keeps its weight as float8 with one scale per output channel (the row's
largest magnitude maps to e4m3's largest, 448); its input is scaled the same way, one scale
per token, as it comes, and the product is `torch._scaled_mm`, which multiplies in float8 on
the tensor cores of GPUs of compute capability 8.9 and newer (Ada, Hopper, Blackwell) and
returns the input's dtype. A scale per token keeps every row of a batch what it would be
alone, so a request's tokens do not depend on the others batched with it.

What stays in its own dtype: the vision tower and the projector (a small share of the bytes,
read once per image), the embeddings, the norms, and the output head, whose rounding would
move the top token directly. On the CPU the same code runs (PyTorch multiplies float8 there
too, slowly): that is how the tests check it.
"""

import torch
from torch import nn

FLOAT8 = torch.float8_e4m3fn
LARGEST = torch.finfo(FLOAT8).max  # 448
TINIEST_SCALE = 1e-12  # an all-zero row keeps a scale that divides


def supported(device: torch.device) -> str | None:
    """None if `device` multiplies in float8; else why not, in words."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"float8 weights are not supported on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (
            f"float8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper, "
            f"Blackwell); {name} is {capability[0]}.{capability[1]}"
        )
    return None


def _quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` ([rows, columns]) as float8 with one float32 scale per row ([rows, 1])."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=TINIEST_SCALE) / LARGEST
    return (x.float() / scale).clamp(-LARGEST, LARGEST).to(FLOAT8), scale


class Float8Linear(nn.Module):
    """A linear layer whose weight is float8 with a scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantized(linear.weight.detach())
        # Parameters (frozen) so that the model's size counts them, as it counts the others'.
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in], row-major
        self.scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, out]
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized, scale = _quantized(rows)
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),  # column-major, as the GPU kernels want the second operand
            scale_a=scale,
            scale_b=self.scale,
            out_dtype=x.dtype,
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8"


@torch.no_grad()
def to_float8(model) -> int:
    """Replace the linear layers of a LLaVA model's language model (its decoder layers; not
    the output head) with `Float8Linear`, one at a time (each layer's bf16 weight is freed as
    its float8 copy is made); returns how many were replaced."""
    replaced = 0
    for layer in model.model.language_model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Float8Linear(child))
                    replaced += 1
    return replaced
