"""Custom operators used inside compiled graphs (PyTorch reference implementations + Triton kernels).

Importing this package registers `torch.ops.fitprune.visual_attention_mass`.
"""

from .attention_mass import cuda_attention_mass, torch_attention_mass, visual_attention_mass

__all__ = ["cuda_attention_mass", "torch_attention_mass", "visual_attention_mass"]
