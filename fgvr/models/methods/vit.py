"""What the token-selection methods (TransFG, FFVT, IELT) read of a timm ViT: the embedded tokens,
the output of each block but the last, and those blocks' attention, and the last block run on
a sequence of their choosing.

Attention is not materialised by the blocks: they keep timm's fused attention (SDPA), and a hook
on each block's `q_norm` / `k_norm` keeps q and k, from which `Pass.scores(i)` computes block i's
raw attention scores on demand, without gradient (selection never needs one), in float32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fgvr.runtime.errors import ConfigError


def check_vit(model: nn.Module, method: str) -> None:
    """A timm ViT with a CLS token and the attention modules these methods read, or one line."""
    blocks = getattr(model, "blocks", None)
    if getattr(model, "cls_token", None) is None or blocks is None or len(blocks) < 2 \
            or not all(hasattr(getattr(b, "attn", None), "q_norm") for b in blocks):
        raise ConfigError(f"method={method}: needs a timm ViT with a CLS token and at least 2 blocks "
                          f"(a VisionTransformer such as vit_base_patch16_224); {type(model).__name__} is not one")


@dataclass
class Pass:
    """One pass through blocks 0..L-2 of a timm ViT."""

    hidden: torch.Tensor  # (B, P+N, D) the tokens entering the last block (P prefix tokens, CLS first)
    outputs: list[torch.Tensor]  # block i's output, i = 0..L-2 (hidden is the last of them)
    prefix: int  # prefix tokens (CLS, registers) before the patches
    scale: float
    qk: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per block, (B, H, P+N, d) each

    @torch.no_grad()
    def scores(self, i: int) -> torch.Tensor:
        """Block i's raw attention scores q k^T / sqrt(d), (B, H, P+N, P+N), float32."""
        q, k = self.qk[i]
        with torch.autocast(q.device.type, enabled=False):  # float32 even inside the run's bf16 autocast
            return (q.float() * self.scale) @ k.float().transpose(-2, -1)

    def probs(self, i: int) -> torch.Tensor:
        """Block i's attention probabilities (softmax over the keys), as its fused attention computed them."""
        return self.scores(i).softmax(-1)


@contextlib.contextmanager
def keeping_qk(blocks: Sequence[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """While the context runs, hooks on each block's `q_norm` and `k_norm` keep its q and k
    (detached): one list per block, [q, k] once the block has run."""
    taps: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = []
    for blk, store in zip(blocks, taps):
        keep = lambda module, inputs, output, store=store: store.append(output.detach())  # noqa: E731
        hooks += [blk.attn.q_norm.register_forward_hook(keep), blk.attn.k_norm.register_forward_hook(keep)]
    try:
        yield taps
    finally:
        for hook in hooks:
            hook.remove()


def first_blocks(model: nn.Module, x: torch.Tensor) -> Pass:
    """Normalised images -> embedding -> blocks 0..L-2, keeping each block's output and its q, k."""
    blocks = model.blocks[:-1]
    with keeping_qk(blocks) as taps:
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        outputs = []
        for blk in blocks:
            h = blk(h)
            outputs.append(h)
    return Pass(h, outputs, model.num_prefix_tokens, blocks[0].attn.scale, [(q, k) for q, k in taps])


def last_block(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The last block and the final norm on a sequence of the methods' choosing -> (B, T, D)."""
    return model.norm(model.blocks[-1](tokens))


def patch_layout(model: nn.Module, image_hw: tuple[int, int]
                 ) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
    """(grid, stride, patch) of a timm ViT's patch embedding at an input size: the conv's own stride
    (under the patch where TransFG makes the patches overlap), after timm's dynamic padding, if on."""
    pe = model.patch_embed
    patch = tuple(pe.patch_size)
    proj = getattr(pe, "proj", None)
    stride = tuple(proj.stride) if isinstance(proj, nn.Conv2d) else patch
    sizes = [-(-s // p) * p if getattr(pe, "dynamic_img_pad", False) else s for s, p in zip(image_hw, patch)]
    grid = tuple((s - p) // t + 1 for s, p, t in zip(sizes, patch, stride))
    return grid, tuple(float(t) for t in stride), tuple(float(p) for p in patch)


def gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, T, D), index (B, K) -> (B, K, D)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
