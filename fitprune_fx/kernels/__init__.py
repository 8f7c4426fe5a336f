"""Custom operators used inside compiled graphs (PyTorch reference implementations + Triton kernels).

Importing this package registers `torch.ops.fitprune.visual_attention_mass` and
`torch.ops.fitprune.attention_with_mass`.
"""

from .attention_mass import cuda_attention_mass, torch_attention_mass, visual_attention_mass
from .fused_attention import attention_with_mass, torch_attention_with_mass

__all__ = [
    "attention_with_mass",
    "cuda_attention_mass",
    "torch_attention_mass",
    "torch_attention_with_mass",
    "visual_attention_mass",
]
