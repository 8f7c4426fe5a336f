"""LLaVA-HR in transformers' conventions: a dual-pathway vision encoder in front of LLaVA.

Vision (per image, pixel side S = `config.image_size`):

    slow: ConvNeXt(image at S px)                       -> [b, C_slow, S/32, S/32]
    fast: CLIP patches(image resized to F px) + pos     -> [b, n, d]     n = (F / patch)^2, no CLS
          4 quarters of the CLIP layers; after each of the first three, a stage fusion adds the
          slow features (resized to the fast grid) through a tanh gate
    out:  final fusion  fast_proj(fast) + slow_proj(slow resized to the fast grid)  -> [b, n, d]

The projector (Linear-GELU-Linear) maps the n fused tokens into the language model, which takes
them where the prompt holds `config.image_token_id`, exactly like transformers' LLaVA. The CLIP and
ConvNeXt pathways are transformers' own `CLIPVisionModel` and `ConvNextModel`; only the fusion
modules are written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from .configuration_llava_hr import LlavaHrConfig


def resize_token_grid(tokens: Tensor, side: int) -> Tensor:
    """[b, m*m, c] tokens of a square grid -> [b, side*side, c].

    Upsampling is bilinear with aligned corners (computed in fp32); downsampling averages
    (m/side)^2 blocks. The two grids must divide one another."""
    b, n, c = tokens.shape
    m = math.isqrt(n)
    if m == side:
        return tokens
    if max(m, side) % min(m, side):
        raise ValueError(
            f"cannot fuse a {m}x{m} feature grid into a {side}x{side} one: neither divides the other"
        )
    grid = tokens.transpose(1, 2).reshape(b, c, m, m)
    if m < side:
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=True).to(
            tokens.dtype
        )
    else:
        grid = F.avg_pool2d(grid, m // side, m // side)
    return grid.flatten(2).transpose(1, 2)


def resample_position_grid(positions: Tensor, side: int) -> Tensor:
    """CLIP's patch position embeddings [m*m, d] -> [side*side, d]: bicubic with antialiasing."""
    n, d = positions.shape
    m = math.isqrt(n)
    if m == side:
        return positions
    grid = positions.float().reshape(1, m, m, d).permute(0, 3, 1, 2)  # [1, d, m, m]
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(side * side, d).to(positions.dtype)


class LlavaHrStageFusion(nn.Module):
    """Mixture-of-resolution adapter after a quarter of the CLIP layers.

    slow [b, C, h, w] -> 1x1 conv, GELU, 1x1 conv to d -> tokens resized to the fast grid;
    fast [b, n, d] -> + 1x1(GELU(depthwise 7x7)) on its grid;
    out = fast + slow * tanh(gate), gate a scalar per image from the mean of [fast, slow] tokens.
    """

    def __init__(self, fast_dim: int, slow_dim: int) -> None:
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(
            nn.Linear(2 * fast_dim, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1)
        )

    def forward(self, fast: Tensor, slow: Tensor) -> Tensor:
        b, n, d = fast.shape
        side = math.isqrt(n)
        slow_tokens = self.slow_proj(F.gelu(self.slow_conv(slow))).flatten(2).transpose(1, 2)  # [b, hw, d]
        slow_tokens = resize_token_grid(slow_tokens, side)  # [b, n, d]
        grid = fast.transpose(1, 2).reshape(b, d, side, side)
        grid = grid + self.fast_proj(F.gelu(self.fast_conv(grid)))
        fast = grid.flatten(2).transpose(1, 2)  # [b, n, d]
        gate = self.gate(torch.cat([fast, slow_tokens], dim=-1).mean(dim=1)).unsqueeze(1)  # [b, 1, 1]
        return fast + slow_tokens * gate.tanh()


class LlavaHrFinalFusion(nn.Module):
    """After the last CLIP layer: fast_proj(fast) + slow_proj(slow tokens on the fast grid)."""

    def __init__(self, fast_dim: int, slow_dim: int) -> None:
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast: Tensor, slow: Tensor) -> Tensor:
        slow_tokens = resize_token_grid(slow.flatten(2).transpose(1, 2), math.isqrt(fast.shape[1]))
        return self.fast_proj(fast) + self.slow_proj(slow_tokens)


class LlavaHrVisionTower(nn.Module):
    """The two pathways and their fusion: pixels [b, 3, S, S] -> fused fast tokens [b, n, d]."""

    def __init__(self, config: LlavaHrConfig) -> None:
        super().__init__()
        self.config = config
        self.fast = AutoModel.from_config(config.vision_config)  # CLIPVisionModel
        self.slow = AutoModel.from_config(
            config.slow_vision_config, attn_implementation="eager"
        )  # ConvNextModel, no attention
        eps = getattr(config.slow_vision_config, "layer_norm_eps", 1e-6)
        for module in self.slow.modules():  # transformers fixes ConvNeXt's inner norms at 1e-6
            if type(module).__name__ == "ConvNextLayerNorm":
                module.eps = eps
        fast_dim = config.vision_config.hidden_size
        slow_dim = config.slow_vision_config.hidden_sizes[-1]
        if len(self.fast.encoder.layers) % 4:
            raise ValueError(
                "LLaVA-HR fuses after each quarter of the CLIP layers: their number must divide by 4"
            )
        stages = 3 if config.stage_fusion else 0
        self.stage_fusions = nn.ModuleList(LlavaHrStageFusion(fast_dim, slow_dim) for _ in range(stages))
        self.final_fusion = LlavaHrFinalFusion(fast_dim, slow_dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"LLaVA-HR takes {size}x{size} images (config.image_size), got "
                f"{tuple(pixel_values.shape[-2:])}: preprocess with the checkpoint's image processor"
            )
        slow = self.slow.embeddings(pixel_values)
        for stage in self.slow.encoder.stages:
            slow = stage(slow)  # [b, C_slow, S/32, S/32] after the last stage

        fast_size = self.config.fast_image_size()
        fast_pixels = F.interpolate(
            pixel_values.float(), size=(fast_size, fast_size), mode="bilinear", align_corners=True
        ).to(pixel_values.dtype)
        emb = self.fast.embeddings
        patches = emb.patch_embedding(fast_pixels.to(emb.patch_embedding.weight.dtype))  # [b, d, g, g]
        side = patches.shape[-1]
        fast = patches.flatten(2).transpose(1, 2)  # [b, n, d]; no CLS token on this path
        fast = fast + resample_position_grid(emb.position_embedding.weight[1:], side)
        fast = self.fast.pre_layrnorm(fast)

        layers = self.fast.encoder.layers
        quarter = len(layers) // 4
        for i, layer in enumerate(layers):
            out = layer(fast, None)
            fast = out[0] if isinstance(out, tuple) else out
            stage = (i + 1) // quarter - 1
            if (i + 1) % quarter == 0 and stage < len(self.stage_fusions):
                fast = self.stage_fusions[stage](fast, slow)
        return self.final_fusion(fast, slow)


class LlavaHrModel(LlavaModel):
    """transformers' `LlavaModel` with LLaVA-HR's vision tower; everything after the features is LLaVA."""

    config_class = LlavaHrConfig

    def __init__(self, config: LlavaHrConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = LlavaHrVisionTower(config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text embedding; when the image token id lies past it, a view that reads it as 0
        (built once per embedding module and kept outside the module tree: no weight saved twice)."""
        embedding = self.language_model.get_input_embeddings()
        if self.config.image_token_id < embedding.num_embeddings:
            return embedding
        safe = self.__dict__.get("_image_safe_embedding")
        if safe is None or safe.embedding is not embedding:
            safe = _ImageTokenSafeEmbedding(embedding)
            self.__dict__["_image_safe_embedding"] = safe
        safe.image_token_id = self.config.image_token_id
        return safe

    def get_image_features(self, pixel_values: Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Projected visual tokens, one [n, hidden] tensor per image in `pooler_output`."""
        features = self.vision_tower(pixel_values)  # [b, n, d]
        projected = self.multi_modal_projector(features)  # [b, n, hidden]
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(projected))


class _ImageTokenSafeEmbedding(nn.Module):
    """The text embedding with image-token ids read as 0: LLaVA-HR's vocabulary has no image token
    (its rows are overwritten by visual features anyway), so the id may lie past the table."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.image_token_id = -1

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embedding(input_ids.masked_fill(input_ids == self.image_token_id, 0))


class LlavaHrForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-HR for generation: `LlavaHrModel` + the language-model head."""

    config_class = LlavaHrConfig

    def __init__(self, config: LlavaHrConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = LlavaHrModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
