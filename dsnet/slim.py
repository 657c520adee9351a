"""Slice-able layers: the only place in dsnet where weights are sliced.

Every layer holds the weights of its largest width and runs at a narrower one by keeping the *first* k channels.
The input channel count is read from the input tensor; the output channel count is an explicit argument of the
call, so no width is ever stored in a module between calls. Each layer can also `export` itself at a given width as
a plain `torch.nn` layer holding copies of the sliced weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

_CACHED_SLICES = 4  # contiguous weight slices a layer keeps for inference
_INFERENCE_CACHES = ("_inference_slices", "_inference_views_cache")


class _DropsInferenceCache:
    """A layer's inference cache is derived from its weights, so it is dropped wherever the weights may be replaced
    without an in-place version bump: copies and pickles leave it behind (views made in no-grad mode of weights later
    updated in place cannot even be deep-copied), and `.to()`, `.double()`, `.cuda()` (through `_apply`, which
    swaps `param.data`), loading a state dict and assigning any attribute (a new parameter or buffer) clear it.
    Assigning `param.data` by hand bypasses this, as it bypasses autograd's version tracking."""

    def __getstate__(self):
        state = super().__getstate__()
        for key in _INFERENCE_CACHES:
            state.pop(key, None)
        return state

    def _clear_inference_cache(self) -> None:
        for key in _INFERENCE_CACHES:
            self.__dict__.pop(key, None)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self._clear_inference_cache()

    def _apply(self, *args, **kwargs):
        self._clear_inference_cache()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_inference_cache()
        return super()._load_from_state_dict(*args, **kwargs)


def _same_stamp(old: tuple, new: tuple) -> bool:
    """Stamps of (weight, weight version, bias, bias version): the same tensor objects at the same versions."""
    return old[0] is new[0] and old[1] == new[1] and old[2] is new[2] and old[3] == new[3]


class SlimConv2d(_DropsInferenceCache, nn.Conv2d):
    """A convolution whose input and output channels are sliced from the front.

    With ``depthwise=True`` the convolution is depthwise at every width: ``groups`` equals the input channel count
    of the call and the output channel count follows it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 depthwise: bool = False, bias: bool = False):
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise convolution needs in_channels == out_channels, got {in_channels} and "
                             f"{out_channels}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                         groups=in_channels if depthwise else 1, bias=bias)
        self.depthwise = depthwise

    def _is_whole(self, in_channels: int, out_channels: int) -> bool:
        return in_channels == self.in_channels and (self.depthwise or out_channels == self.out_channels)

    def sliced_weight(self, in_channels: int, out_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._is_whole(in_channels, out_channels):
            return self.weight, self.bias  # the whole layer: no slice for autograd to scatter back
        if self.depthwise:
            weight = self.weight[:in_channels]
            out_channels = in_channels
        else:
            weight = self.weight[:out_channels, :in_channels]
        bias = None if self.bias is None else self.bias[:out_channels]
        return weight, bias

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        in_channels = x.shape[1]
        if out_channels is None:
            out_channels = self.out_channels
        if torch.is_grad_enabled():
            weight, bias = self.sliced_weight(in_channels, out_channels)
        else:
            weight, bias = self._inference_weight(in_channels, out_channels)
        groups = in_channels if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _inference_weight(self, in_channels: int, out_channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A contiguous copy of the slice, reused while the weights are unchanged (same tensors, same version).

        Without it a strided slice is copied inside the convolution on every call. Evaluation runs one width for
        many batches, so a few entries suffice; the bound keeps a search over many plans from holding copies.
        """
        params = self._parameters  # not self.weight: Module.__getattr__ costs more than the rest of the check
        weight, bias = params["weight"], params["bias"]
        if self._is_whole(in_channels, out_channels):
            return weight, bias  # nothing to slice, nothing to cache
        # The tensors themselves and their in-place versions: a forward after a metadata check on every layer is
        # what this cache costs at batch 1, so the check reads as little as it can.
        stamp = (weight, weight._version, bias, None if bias is None else bias._version)
        cache = self.__dict__.setdefault("_inference_slices", {})
        entry = cache.get((in_channels, out_channels))
        if entry is None or not _same_stamp(entry[0], stamp):
            if len(cache) >= _CACHED_SLICES:
                cache.clear()
            weight, bias = self.sliced_weight(in_channels, out_channels)
            entry = (stamp, weight.contiguous(), bias)
            cache[(in_channels, out_channels)] = entry
        return entry[1], entry[2]

    def export(self, in_channels: int, out_channels: int) -> nn.Conv2d:
        weight, bias = self.sliced_weight(in_channels, out_channels)
        groups = in_channels if self.depthwise else 1
        conv = nn.Conv2d(in_channels, weight.shape[0], self.kernel_size, self.stride, self.padding,
                         groups=groups, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv


class SlimBatchNorm2d(_DropsInferenceCache, nn.Module):
    """BatchNorm with one shared affine, sliced from the front, and private running statistics per slot.

    A *slot* is one set of running statistics: the supernet gives each width choice its own slot, plus one slot for
    an explicit plan that is not a choice (filled by BN recalibration). Statistics live in ``(num_slots, C)``
    buffers; slicing a row keeps a contiguous prefix, so ``F.batch_norm`` updates it in place.
    ``momentum=None`` gives the cumulative average that recalibration uses, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, num_slots: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.num_features = num_features
        self.num_slots = num_slots
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_slots, num_features))
        self.register_buffer("running_var", torch.ones(num_slots, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_slots, dtype=torch.long))

    def reset_slot(self, slot: int) -> None:
        self.running_mean[slot].zero_()
        self.running_var[slot].fill_(1.0)
        self.num_batches_tracked[slot].zero_()

    def add_slots(self, count: int) -> None:
        """Append `count` empty statistics slots."""
        self.running_mean = torch.cat([self.running_mean, self.running_mean.new_zeros(count, self.num_features)])
        self.running_var = torch.cat([self.running_var, self.running_var.new_ones(count, self.num_features)])
        self.num_batches_tracked = torch.cat([self.num_batches_tracked, self.num_batches_tracked.new_zeros(count)])
        self.num_slots += count

    def forward(self, x: torch.Tensor, slot: int | None) -> torch.Tensor:
        """Normalise `x` (its channels are the first of this layer's) with the statistics of `slot`; in training,
        `slot=None` normalises with the batch statistics and updates no running statistics."""
        c = x.shape[1]
        if slot is not None and not self.training and not torch.is_grad_enabled():
            return F.batch_norm(x, *self._inference_views(c, slot), False, 0.0, self.eps)
        weight, bias = (self.weight, self.bias) if c == self.num_features else (self.weight[:c], self.bias[:c])
        if slot is None:
            if not self.training:
                raise ValueError("BN without a statistics slot needs training mode (batch statistics)")
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        factor = 0.0
        if self.training:
            self.num_batches_tracked[slot].add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked[slot])
        return F.batch_norm(x, self.running_mean[slot, :c], self.running_var[slot, :c], weight, bias, self.training,
                            factor, self.eps)

    def _inference_views(self, c: int, slot: int) -> tuple[torch.Tensor, ...]:
        """Views of the statistics and affine for (channels, slot), made once: views follow in-place updates, and
        replacing a tensor (assignment, `_apply`, a state-dict load) clears the cache."""
        cache = self.__dict__.setdefault("_inference_views_cache", {})
        views = cache.get((c, slot))
        if views is None:
            if len(cache) >= 4 * _CACHED_SLICES:
                cache.clear()
            views = (self.running_mean[slot, :c], self.running_var[slot, :c], self.weight[:c], self.bias[:c])
            cache[(c, slot)] = views
        return views

    def export(self, channels: int, slot: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, eps=self.eps, momentum=0.1 if self.momentum is None else self.momentum,
                            device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(self.weight[:channels])
            bn.bias.copy_(self.bias[:channels])
            bn.running_mean.copy_(self.running_mean[slot, :channels])
            bn.running_var.copy_(self.running_var[slot, :channels])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[slot])
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, slots={self.num_slots}, eps={self.eps}, momentum={self.momentum}"


class SlimLinear(nn.Linear):
    """A linear layer whose input features are sliced from the front (the classifier of a slimmable network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[1]
        return F.linear(x, self.weight if features == self.in_features else self.weight[:, :features], self.bias)

    def export(self, in_features: int) -> nn.Linear:
        linear = nn.Linear(in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight[:, :in_features])
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Adaptive average pooling to 1×1, flattened: works at any channel count."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


class SlimSqueezeExcite(nn.Module):
    """Squeeze-excitation whose channels and reduced channels are both sliced from the front.

    Same arithmetic as ``torchvision.ops.SqueezeExcitation`` (pool → reduce → ReLU → expand → sigmoid → scale),
    which is what it exports to; parameter names follow timm (``conv_reduce``, ``conv_expand``).
    """

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.conv_reduce = SlimConv2d(channels, reduced_channels, 1, bias=True)
        self.conv_expand = SlimConv2d(reduced_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, reduced_channels: int) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.relu(self.conv_reduce(s, reduced_channels))
        s = self.conv_expand(s, x.shape[1])
        return x * torch.sigmoid(s)

    def export(self, channels: int, reduced_channels: int) -> nn.Module:
        se = torchvision.ops.SqueezeExcitation(channels, reduced_channels)
        se.fc1 = self.conv_reduce.export(channels, reduced_channels)
        se.fc2 = self.conv_expand.export(reduced_channels, channels)
        return se
