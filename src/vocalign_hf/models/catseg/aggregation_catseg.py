"""CAT-Seg cost aggregation: spatial Swin blocks, class-level linear attention and the upsampling decoder.

A clean-room re-implementation of the aggregator of cvlab-kaist/CAT-Seg (CVPR'24,
`cat_seg/modeling/transformer/model.py`). Parameter names follow the reference so that converted checkpoints map
one to one; classes carry transformers' `CATSeg` prefix, and where their name says what they compute rather
than the reference's, their docstring gives the reference's. Differences, none of which change the numbers
beyond float rounding:

* window attention runs through transformers' attention interface (SDPA by default, `attn_implementation="eager"`
  writes it out);
* the shifted-window mask is a non-persistent buffer (the reference saves it in the checkpoint);
* layers that read a concatenation [x, guidance] (the Swin and class-attention q/k projections, the first decoder
  conv) apply the two halves of their weight separately: the guidance half runs once per image (appearance and
  decoder guidance, shared by the T classes) or once per image and class (text guidance, shared by the pixels),
  instead of on T or H*W copies, and the copies are never built;
* the class slices are laid out (B, T, H, W, C) in memory (channels last) from the first Swin block to the decoder;
  the Swin blocks apply the shift and window partition as one token permutation per block; the 2x2 transposed
  convolutions run as one GEMM plus a pixel shuffle; without autograd the Swin blocks, the decoder and the
  feed-forward layers run in chunks of class slices or rows (`map_class_slices`, `chunked_feed_forward`);
* the class-attention padding tokens (the reference pads the class axis to `pad_len` = 256 with one learned
  token) are identical at every position, so their contribution to the linear attention's key/value sums is
  added in closed form instead of materialising `pad_len - T` tokens. Their outputs are discarded by the
  reference, so the result is the same while the cost scales with the real number of classes.

Each of these paths is kept because `benchmarks/fast_paths.py` shows that its plain form costs at least 5 % more
time or 10 % more peak memory of the aggregator where it applies (docs/performance.md, "Issue 25, part 6").

The mmsegmentation CAT-Seg v1 (andraghetti/VocAlign, `cat_aggregator.py` + `cat_head.py`) has the same layers
under other names (the converter maps them) and differs in one computation: its class-aggregation MLP is mmcv's
`FFN`, which adds its own input, so that step is `x + norm2(x) + MLP(norm2(x))` (`config.class_mlp_adds_input`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward  # transformers' written-out attention


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window_size * window_size, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(resolution: int, window_size: int, shift: int) -> torch.Tensor:
    """Additive (-100 / 0) attention mask of the shifted windows, shape (num_windows, ws*ws, ws*ws)."""
    img_mask = torch.zeros(1, resolution, resolution, 1)
    spans = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    region = 0
    for hs in spans:
        for ws in spans:
            img_mask[:, hs, ws, :] = region
            region += 1
    windows = window_partition(img_mask, window_size).squeeze(-1)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def add_per_group(x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """x (N * group, ...) + shared (N, ...), row i of x getting row i // group of `shared`, without copying `shared`."""
    return (x.unflatten(0, (shared.shape[0], -1)) + shared.unsqueeze(1)).flatten(0, 1)


def linear_of_concat(linear: nn.Linear, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """`linear(cat([x, g]))` without building the concatenation, for guidance shared by groups of rows of x.

    `x` is (N * group, ..., D) and `guidance` (N, ..., G): row i of x goes with guidance row i // group (the T
    classes of an image share its appearance guidance; the pixels of an image share its text guidance). The
    guidance half of the weight is applied once per guidance row instead of once per class or pixel.
    """
    dim = x.shape[-1]
    out = F.linear(x, linear.weight[:, :dim], linear.bias)
    if guidance is None:
        return out
    return add_per_group(out, F.linear(guidance, linear.weight[:, dim:]))


FEED_FORWARD_CHUNK_ROWS = 1024


def chunked_feed_forward(x: torch.Tensor, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear) -> torch.Tensor:
    """`fc2(act(fc1(x)))`; without autograd, in chunks of `FEED_FORWARD_CHUNK_ROWS` tokens, so that the 4x wider
    hidden activation stays in cache instead of being written to and read back from memory (the result is the
    same bit for bit: every row is computed by the same kernels). With autograd the plain form is kept, since
    backward needs the whole hidden activation anyway."""
    if torch.is_grad_enabled() or x.numel() // x.shape[-1] <= FEED_FORWARD_CHUNK_ROWS:
        return fc2(act(fc1(x)))
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], fc2.out_features)
    for start in range(0, flat.shape[0], FEED_FORWARD_CHUNK_ROWS):
        rows = slice(start, start + FEED_FORWARD_CHUNK_ROWS)
        out[rows] = fc2(act(fc1(flat[rows])))
    return out.view(*x.shape[:-1], fc2.out_features)


class CATSegMLP(nn.Module):
    """fc1 -> GELU -> fc2 (timm's `Mlp` without dropout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_feed_forward(x, self.fc1, self.act, self.fc2)


class CATSegWindowAttention(nn.Module):
    """Window self-attention whose queries and keys also see the appearance guidance.

    The attention itself runs through transformers' attention interface: `config._attn_implementation` (`"sdpa"`
    by default, `"eager"`, ...; `model.set_attn_implementation` switches it) picks the function at every call."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, config) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.num_heads = num_heads
        self.scaling = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def project_guidance(self, guidance: torch.Tensor | None) -> torch.Tensor | None:
        """The guidance halves of q and k: guidance (B, N, G) -> (B, N, 2*dim), once per image."""
        if guidance is None:
            return None
        return F.linear(guidance, torch.cat([self.q.weight[:, self.dim :], self.k.weight[:, self.dim :]]))

    def project_qkv(self, x: torch.Tensor, projected_guidance: torch.Tensor | None) -> torch.Tensor:
        """q, k, v of every token, concatenated: x (G*T, N, dim), projected guidance (G, N, 2*dim) from
        `project_guidance` (row i of x goes with guidance row i // T) -> (G*T, N, 3*dim)."""
        d = self.dim
        # One GEMM for the token halves of q, k and v (weights are stacked, activations never concatenated).
        weight = torch.cat([self.q.weight[:, :d], self.k.weight[:, :d], self.v.weight])
        qkv = F.linear(x, weight, torch.cat([self.q.bias, self.k.bias, self.v.bias]))
        if projected_guidance is None:
            return qkv
        return add_per_group(qkv, F.pad(projected_guidance, (0, d)))  # v does not see the guidance: zero third

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None, num_windows: int) -> torch.Tensor:
        """qkv: (B * nW, N, 3 * dim) windows of `project_qkv`'s output; mask: (nW, N, N) additive or None."""
        bw, n, _ = qkv.shape
        # 4-D tensors so that SDPA can pick a fused kernel; the mask repeats over the images of the batch.
        q, k, v = (t.reshape(bw, n, self.num_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attn_mask = None
        if mask is not None:
            attn_mask = mask.to(q.dtype).unsqueeze(0).expand(bw // num_windows, -1, -1, -1).reshape(bw, 1, n, n)
        # Unset only outside a model (a bare aggregator): the model's default then, SDPA.
        implementation = self.config._attn_implementation or "sdpa"
        attention = eager_attention_forward
        if implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        out, _ = attention(self, q, k, v, attn_mask, scaling=self.scaling, dropout=0.0, is_causal=False)
        return self.proj(out.reshape(bw, n, -1))


@functools.lru_cache(maxsize=None)
def window_token_order(resolution: int, window_size: int, shift: int) -> torch.Tensor:
    """Token permutation of a (shifted) window partition: `x[:, order]` for x (N, H*W, C) in row-major order equals
    `window_partition(roll(x, -shift), window_size)` flattened to (N, H*W, C).

    Built outside inference mode: the cached tensor is shared by every later call, and one first made under
    `torch.inference_mode()` (a demo, a pipeline) could not index a forward that trains."""
    with torch.inference_mode(False):
        index = torch.arange(resolution * resolution).view(1, resolution, resolution, 1)
        if shift:
            index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
        return window_partition(index, window_size).flatten()


class CATSegSwinTransformerBlock(nn.Module):
    """A (shifted-)window transformer block over the patch grid of one class's cost slice.

    Works on tokens already in this block's window order (`token_order`): every other operation of the block is
    per token, so the cyclic shift and the window partition reduce to one permutation of the tokens, which
    `CATSegSpatialAggregation` applies once per block instead of rolling and partitioning q, k, v and the output.
    """

    def __init__(
        self, dim: int, guidance_dim: int, resolution: int, num_heads: int, window_size: int, shift: int, config
    ) -> None:
        super().__init__()
        if resolution <= window_size:  # as the reference: one window, no shift
            window_size, shift = resolution, 0
        self.resolution, self.window_size, self.shift = resolution, window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CATSegWindowAttention(dim, guidance_dim, num_heads, config)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = CATSegMLP(dim, 4 * dim)
        mask = shifted_window_mask(resolution, window_size, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def token_order(self, device: torch.device) -> torch.Tensor:
        """(H*W,) natural token index of each position in window order."""
        return window_token_order(self.resolution, self.window_size, self.shift).to(device)

    def forward(self, x: torch.Tensor, projected_guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (G*T, H*W, C) and the guidance's share of q and k, `attn.project_guidance(guidance)`: (G, H*W, 2C)
        (shared by the T classes of an image) or None, both with their tokens in this block's window order
        (`token_order`); returns (G*T, H*W, C) in the same order."""
        r, ws = self.resolution, self.window_size
        b, _, c = x.shape
        h = self.attn.project_qkv(self.norm1(x), projected_guidance)  # (G*T, H*W, 3C): runs of ws*ws are windows
        h = self.attn(h.view(-1, ws * ws, h.shape[-1]), self.attn_mask, num_windows=(r // ws) ** 2)
        x = x + h.view(b, r * r, c)
        return x + self.mlp(self.norm2(x))


class CATSegSpatialAggregation(nn.Module):
    """Spatial aggregation: a regular and a shifted Swin block applied to every class slice independently (the
    reference's `SwinTransformerBlockWrapper`)."""

    def __init__(self, dim: int, guidance_dim: int, resolution: int, num_heads: int, window_size: int, config) -> None:
        super().__init__()
        self.block_1 = CATSegSwinTransformerBlock(dim, guidance_dim, resolution, num_heads, window_size, 0, config)
        self.block_2 = CATSegSwinTransformerBlock(
            dim, guidance_dim, resolution, num_heads, window_size, window_size // 2, config
        )
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, G, H, W) or None. Returns (B, C, T, H, W) laid out as (B, T, H, W, C)
        in memory (channels-last class slices)."""
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # a view when x is already laid out so
        if guidance is not None:  # the same for every class: normalised (and projected) once per image
            guidance = self.guidance_norm(guidance.flatten(2).transpose(1, 2))
        order_1, order_2 = self.block_1.token_order(x.device), self.block_2.token_order(x.device)
        natural_to_1 = torch.empty_like(order_1)
        natural_to_1[order_1] = torch.arange(order_1.numel(), device=x.device)
        one_to_2 = natural_to_1[order_2]
        back = torch.empty_like(order_2)
        back[order_2] = torch.arange(order_2.numel(), device=x.device)
        guidance_1, guidance_2 = None, None
        if guidance is not None:  # q/k guidance terms once per image, in each block's token order
            guidance_1 = self.block_1.attn.project_guidance(guidance[:, order_1])
            guidance_2 = self.block_2.attn.project_guidance(guidance[:, order_2])

        def both_blocks(slices: torch.Tensor, image: slice) -> torch.Tensor:
            # One token permutation per block: natural -> block 1's windows -> block 2's shifted windows -> natural.
            g1 = guidance_1[image] if guidance_1 is not None else None
            g2 = guidance_2[image] if guidance_2 is not None else None
            slices = self.block_1(slices[:, order_1], g1)
            return self.block_2(slices[:, one_to_2], g2)[:, back]

        out = map_class_slices(both_blocks, x, b)
        return out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


INFERENCE_CHUNK_SLICES = 8


def map_class_slices(fn, slices: torch.Tensor, batch: int) -> torch.Tensor:
    """`fn(slices[rows], images)` over class slices (B*T, ...), T per image; `images` indexes per-image tensors.

    With autograd, one call on all rows. Without it, `INFERENCE_CHUNK_SLICES` slices of one image at a time
    written into one output: the activations stay in cache and their peak memory is a chunk's (the same kernels
    run on the same rows, so the result is the same)."""
    if torch.is_grad_enabled():
        return fn(slices, slice(None))
    classes, out = slices.shape[0] // batch, None
    for first in range(0, slices.shape[0], classes):  # the first row of each image
        for start in range(first, first + classes, INFERENCE_CHUNK_SLICES):
            rows = slice(start, min(start + INFERENCE_CHUNK_SLICES, first + classes))
            chunk = fn(slices[rows], slice(first // classes, first // classes + 1))
            if out is None:
                out = chunk.new_empty(slices.shape[0], *chunk.shape[1:])
            out[rows] = chunk
    return out


def _elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


class CATSegClassAttention(nn.Module):
    """Class-axis attention (linear "Transformers are RNNs" attention by default, or full softmax); the
    reference's `AttentionLayer`."""

    def __init__(self, hidden_dim: int, guidance_dim: int, num_heads: int, attention_type: str, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.eps = eps
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)

    def _project(self, x: torch.Tensor, guidance: torch.Tensor | None):
        """x: (N * group, T, C); guidance: (N, T, G) shared by each group of rows (the pixels of an image)."""
        split = lambda t: t.unflatten(-1, (self.num_heads, -1))  # noqa: E731 - (..., H, D)
        q, k = linear_of_concat(self.q, x, guidance), linear_of_concat(self.k, x, guidance)
        return split(q), split(k), split(self.v(x))

    def forward(
        self,
        x: torch.Tensor,
        guidance: torch.Tensor | None,
        pad_x: torch.Tensor | None = None,
        pad_guidance: torch.Tensor | None = None,
        num_pad: int = 0,
    ) -> torch.Tensor:
        """x: (B * P, T, C) for P pixels per image, guidance: (B, T, G) or None. `num_pad` extra key/value tokens
        equal to the projection of (`pad_x`, `pad_guidance`) take part in the attention; only the T real tokens are
        returned."""
        q, k, v = self._project(x, guidance)  # (N, T, H, D)
        if num_pad:
            _, pk, pv = self._project(pad_x, pad_guidance)  # (1, 1, H, D)
        if self.attention_type == "linear":
            q, k = _elu_feature_map(q), _elu_feature_map(k)
            kv = torch.einsum("nshd,nshv->nhdv", k, v)
            k_sum = k.sum(dim=1)
            if num_pad:
                pk = _elu_feature_map(pk)
                kv = kv + num_pad * torch.einsum("nshd,nshv->nhdv", pk, pv)
                k_sum = k_sum + num_pad * pk[:, 0]
            z = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k_sum) + self.eps)
            out = torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z)
        else:
            if num_pad:
                n = x.shape[0]
                k = torch.cat([k, pk.expand(n, num_pad, -1, -1)], dim=1)
                v = torch.cat([v, pv.expand(n, num_pad, -1, -1)], dim=1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        return out.flatten(-2)


class CATSegClassAggregation(nn.Module):
    """Class aggregation: attention across the class axis at every (pooled) pixel (the reference's
    `ClassTransformerLayer`)."""

    def __init__(
        self,
        hidden_dim: int,
        guidance_dim: int,
        num_heads: int,
        attention_type: str,
        pooling_size,
        pad_len: int,
        mlp_adds_input: bool = False,
    ) -> None:
        super().__init__()
        self.mlp_adds_input = mlp_adds_input
        self.pool = nn.AvgPool2d(tuple(pooling_size)) if pooling_size is not None else nn.Identity()
        self.attention = CATSegClassAttention(hidden_dim, guidance_dim, num_heads, attention_type)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if pad_len > 0 else None
        self.padding_guidance = (
            nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None
        )

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, T, H, W); guidance: (B, T, G) or None.

        Works in the (B, T, H, W, C) memory layout the Swin blocks leave behind (channels-last class slices): only
        the pooled tokens are transposed, and the residual sum keeps the layout of `x`.
        """
        b, c, t, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)
        pooled = self.pool(slices)  # (B*T, C, hp, wp), channels last
        hp, wp = pooled.shape[-2:]
        tokens = pooled.permute(0, 2, 3, 1).reshape(b, t, hp * wp, c).transpose(1, 2).reshape(b * hp * wp, t, c)
        num_pad = max(self.pad_len - t, 0) if self.padding_tokens is not None else 0
        pad_x = self.norm1(self.padding_tokens) if num_pad else None
        pad_g = self.padding_guidance if (num_pad and guidance is not None) else None
        tokens = tokens + self.attention(self.norm1(tokens), guidance, pad_x, pad_g, num_pad)
        normed = self.norm2(tokens)
        mlp = chunked_feed_forward(normed, *self.mlp)
        tokens = tokens + (normed + mlp if self.mlp_adds_input else mlp)
        tokens = tokens.view(b, hp, wp, t, c).permute(0, 3, 1, 2, 4).reshape(b * t, hp, wp, c).permute(0, 3, 1, 2)
        tokens = F.interpolate(tokens, size=(h, w), mode="bilinear", align_corners=True)  # stays channels last
        return x + tokens.view(b, t, c, h, w).transpose(1, 2)


class CATSegAggregatorLayer(GradientCheckpointingLayer):
    """One spatial + one class aggregation step (checkpointable as a unit)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.swin_block = CATSegSpatialAggregation(
            config.hidden_dim,
            config.appearance_guidance_proj_dim,
            config.feature_resolution,
            config.num_heads,
            config.window_size,
            config,
        )
        self.attention = CATSegClassAggregation(
            config.hidden_dim,
            config.text_guidance_proj_dim,
            config.num_heads,
            config.attention_type,
            config.pooling_size,
            config.pad_len,
            mlp_adds_input=config.class_mlp_adds_input,
        )

    def forward(self, x: torch.Tensor, appearance_guidance, text_guidance) -> torch.Tensor:
        return self.attention(self.swin_block(x, appearance_guidance), text_guidance)


class CATSegDoubleConv(nn.Module):
    """(conv3x3 -> GroupNorm -> ReLU) x 2, as the reference (GroupNorm groups = channels // 16)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = max(out_channels // 16, 1)
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class CATSegDecoderBlock(nn.Module):
    """x2 transposed-conv upsampling, concatenation with the (class-shared) guidance, then a double conv (the
    reference's `Up`)."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = CATSegDoubleConv(in_channels, out_channels)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """`self.up(x)` (kernel 2, stride 2: the 2x2 output patches do not overlap) as one GEMM over channels-last
        pixels followed by a pixel shuffle; returns a channels-last tensor. oneDNN's transposed convolution runs
        this shape far below the matmul peak on CPU."""
        n, c_in, h, w = x.shape
        weight = self.up.weight  # (C_in, C_out, 2, 2)
        c_out = weight.shape[1]
        pixels = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # a view for channels-last input
        out = F.linear(pixels, weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in), self.up.bias.repeat(4))
        out = out.view(n, h, w, 2, 2, c_out).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c_out)
        return out.permute(0, 3, 1, 2)

    def project_guidance(self, guidance: torch.Tensor | None) -> torch.Tensor | None:
        """The guidance half of the first convolution, (B, G, 2h, 2w) -> (B, out, 2h, 2w): once per image."""
        if guidance is None:
            return None
        first = self.conv.double_conv[0]
        weight = first.weight[:, first.in_channels - guidance.shape[1] :].contiguous(memory_format=torch.channels_last)
        return F.conv2d(guidance.contiguous(memory_format=torch.channels_last), weight, padding=1)

    def forward(self, x: torch.Tensor, projected_guidance: torch.Tensor | None) -> torch.Tensor:
        """x: (G*T, C, h, w) class slices; projected_guidance: `project_guidance(guidance)` (G, out, 2h, 2w), shared
        by the T classes of an image, or None.

        Runs channels last (oneDNN's convolutions are about 1.7x faster on CPU in that layout for these small
        channel counts); the result is channels last too.
        """
        cl = torch.channels_last
        x = self.upsample(x.contiguous(memory_format=cl))
        first, rest = self.conv.double_conv[0], self.conv.double_conv[1:]
        # conv(cat[x, g]) = conv_x(x) + conv_g(g) (bias-free): the guidance half runs once per image, not per class.
        out = F.conv2d(x, first.weight[:, : x.shape[1]].contiguous(memory_format=cl), padding=1)
        if projected_guidance is not None:
            out = add_per_group(out, projected_guidance)
        return rest(out)


class CATSegAggregator(nn.Module):
    """Cost-volume embedding, aggregation layers and the upsampling decoder of CAT-Seg."""

    def __init__(self, config) -> None:
        super().__init__()
        embed_dim = config.clip_config.projection_dim
        self.pad_len = config.pad_len
        self.layers = nn.ModuleList([CATSegAggregatorLayer(config) for _ in range(config.num_layers)])
        self.conv1 = nn.Conv2d(config.num_templates, config.hidden_dim, kernel_size=7, stride=1, padding=3)
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(config.appearance_guidance_dim, config.appearance_guidance_proj_dim, 3, stride=1, padding=1),
            nn.ReLU(),
        )
        self.text_guidance_projection = nn.Sequential(nn.Linear(embed_dim, config.text_guidance_proj_dim), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, dp, kernel_size=3, stride=1, padding=1), nn.ReLU())
            for d, dp in zip(config.decoder_guidance_dims, config.decoder_guidance_proj_dims)
        )
        dims, guidance_dims = config.decoder_dims, config.decoder_guidance_proj_dims
        self.decoder1 = CATSegDecoderBlock(config.hidden_dim, dims[0], guidance_dims[0])
        self.decoder2 = CATSegDecoderBlock(dims[0], dims[1], guidance_dims[1])
        self.head = nn.Conv2d(config.decoder_dims[1], 1, kernel_size=3, stride=1, padding=1)

    @staticmethod
    def correlation(img_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Cosine cost volume of Eq. 1: (B, D, H, W) x (B, T, P, D) -> (B, P, T, H, W)."""
        img_feats = F.normalize(img_feats, dim=1)
        text_feats = F.normalize(text_feats, dim=-1)
        return torch.einsum("bchw,btpc->bpthw", img_feats, text_feats)

    def forward(
        self, img_feats: torch.Tensor, text_feats: torch.Tensor, guidance: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """img_feats: (B, D, h, w) dense CLIP features; text_feats: (B, T, P, D); guidance: (appearance (B, D, h, w),
        decoder guidance 1, decoder guidance 2). Returns logits (B, T, 4h, 4w)."""
        corr = self.correlation(img_feats, text_feats)
        num_classes = text_feats.shape[1]
        kept = None
        if 0 < self.pad_len < num_classes:
            # As the reference: keep the pad_len classes with the highest cost anywhere; the rest get -100.
            best = corr.transpose(1, 2).flatten(2).max(dim=-1).values
            kept = best.topk(self.pad_len, dim=-1, sorted=False).indices
            text_feats = F.normalize(text_feats, dim=-1)
            text_feats = torch.gather(text_feats, 1, kept[..., None, None].expand(-1, -1, *text_feats.shape[2:]))
            corr = self.correlation(img_feats, text_feats)
        b, p, t, h, w = corr.shape
        x = self.conv1(corr.transpose(1, 2).reshape(b * t, p, h, w))
        x = x.view(b, t, -1, h, w).transpose(1, 2)  # (B, C, T, H, W)

        appearance = self.guidance_projection(guidance[0])
        decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance[1:])]
        text_guidance = self.text_guidance_projection(F.normalize(text_feats.mean(dim=-2), dim=-1))

        for layer in self.layers:
            x = layer(x, appearance, text_guidance)

        x = x.transpose(1, 2).reshape(b * t, -1, h, w)  # a view of the channels-last class slices
        guidance_1 = self.decoder1.project_guidance(decoder_guidance[0])
        guidance_2 = self.decoder2.project_guidance(decoder_guidance[1])

        def decode(slices: torch.Tensor, image: slice) -> torch.Tensor:
            g1 = guidance_1[image] if guidance_1 is not None else None
            g2 = guidance_2[image] if guidance_2 is not None else None
            return self.head(self.decoder2(self.decoder1(slices, g1), g2))

        logits = map_class_slices(decode, x, b).reshape(b, t, 4 * h, 4 * w)
        if kept is not None:
            full = logits.new_full((b, num_classes, *logits.shape[-2:]), -100.0)
            logits = full.scatter(1, kept[..., None, None].expand(-1, -1, *logits.shape[-2:]), logits)
        return logits
