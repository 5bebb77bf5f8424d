"""The fast CIFAR-10 recipe in PyTorch, written from its published description with the
library's own modules (nn.Conv2d, nn.BatchNorm2d, nn.GELU, torch.optim.SGD with Nesterov
momentum, LambdaLR), as the baseline xpnet's :mod:`xpnet.recipes.fast94` is measured
against. No torch.compile.

The random draws (the first epoch's flips, each epoch's translations and batch order)
come from a :class:`TorchDraws` by default; a test can hand in xpnet's draws instead, so
that both sides see the same batches.
"""

from __future__ import annotations

import math
import time
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fast94 import CIFAR10_MEAN, CIFAR10_STD, Fast94Result, Fast94Settings

__all__ = ["make_net", "xpnet_names", "TorchDraws", "train", "evaluate", "fast94_torch", "normalize"]


class _Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d without a trained scale (the weight stays 1)."""

    def __init__(self, num_features, momentum, eps):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    """3x3, padding 'same', no bias; the first min(C_out, C_in) filters start as the identity."""

    def __init__(self, channels_in, channels_out):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class _ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out, momentum, eps):
        super().__init__()
        self.conv1 = _Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(channels_out, momentum, eps)
        self.conv2 = _Conv(channels_out, channels_out)
        self.norm2 = _BatchNorm(channels_out, momentum, eps)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def make_net(settings: Fast94Settings, dtype=torch.float32, device="cpu") -> nn.Sequential:
    """The recipe's network; the whitening conv's weights are frozen (set them with
    :func:`init_whitening`)."""
    w1, w2, w3 = settings.widths
    whiten_width = 2 * 3 * 2**2
    net = nn.Sequential(
        nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True),
        nn.GELU(),
        _ConvGroup(whiten_width, w1, settings.bn_momentum, settings.bn_eps),
        _ConvGroup(w1, w2, settings.bn_momentum, settings.bn_eps),
        _ConvGroup(w2, w3, settings.bn_momentum, settings.bn_eps),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(w3, 10, bias=False),
        _Mul(settings.scale),
    )
    net[0].weight.requires_grad = False
    return net.to(device=device, dtype=dtype)


def xpnet_names(net: nn.Sequential) -> dict:
    """xpnet's FastConvNet names -> this net's tensors (the head's weight is transposed
    in xpnet: (F, 10) against (10, F)). Buffers are named "running_mean1".. and "running_var1".."""
    names = {"whiten_W": net[0].weight, "whiten_b": net[0].bias, "W_out": net[7].weight}
    for g in range(3):
        group: Any = net[2 + g]  # a _ConvGroup: nn.Sequential's indexing is typed as any Module
        for k, (conv, norm) in enumerate(((group.conv1, group.norm1), (group.conv2, group.norm2))):
            i = 2 * g + k + 1
            names[f"W{i}"], names[f"beta{i}"] = conv.weight, norm.bias
            names[f"running_mean{i}"], names[f"running_var{i}"] = norm.running_mean, norm.running_var
    return names


def init_whitening(layer: nn.Conv2d, images: torch.Tensor, eps: float) -> None:
    """The whitening filters: eigenvectors of the 2x2 patch covariance of ``images``,
    scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
    c, (h, w) = images.shape[1], layer.weight.shape[2:]
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32  # eigh has no float16
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).to(dtype)
    flat = patches.reshape(len(patches), -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
    eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    layer.weight.data[:] = torch.cat((scaled, -scaled))


def normalize(images_uint8_or_float: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32, 3) pixels 0..255 -> normalised (N, 3, 32, 32)."""
    x = images_uint8_or_float.permute(0, 3, 1, 2) if images_uint8_or_float.shape[1] != 3 else images_uint8_or_float
    mean = torch.tensor(CIFAR10_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


class TorchDraws:
    """The run's random choices from a seeded torch generator on the data's device."""

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device

    def flip_mask(self, n):
        """(N,) bool: which images the first epoch mirrors."""
        return torch.rand(n, device=self.device, generator=self.generator) < 0.5

    def shifts(self, epoch, n, max_shift):
        """(N, 2) int64 offsets (rows, columns) in [-max_shift, max_shift]."""
        return torch.randint(-max_shift, max_shift + 1, (n, 2), device=self.device, generator=self.generator)

    def order(self, epoch, n):
        """(N,) int64: the epoch's batch order."""
        return torch.randperm(n, device=self.device, generator=self.generator)


def _crop(padded, shifts, size, max_shift):
    out = torch.empty((len(padded), padded.shape[1], size, size), device=padded.device, dtype=padded.dtype)
    for sy in range(-max_shift, max_shift + 1):
        for sx in range(-max_shift, max_shift + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            r, c = max_shift + sy, max_shift + sx
            out[mask] = padded[mask, :, r : r + size, c : c + size]
    return out


def _lookahead_decay(step, total):
    return 0.95**5 * (step / total) ** 3


def train(net, images, labels, settings: Fast94Settings, draws, channels_last=False) -> list:
    """Train ``net`` on normalised ``images`` (N, 3, 32, 32); returns each step's loss (tensors)."""
    batch_size, momentum = settings.batch_size, settings.momentum
    per_epoch = len(images) // batch_size
    total = math.ceil(per_epoch * settings.epochs)
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = settings.learning_rate / kilostep
    wd = settings.weight_decay * batch_size / kilostep
    lr_biases = lr * settings.bias_scaler
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    others = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
            dict(params=others, lr=lr, weight_decay=wd / lr),
        ],
        momentum=momentum,
        nesterov=True,
    )

    def schedule(step):
        warmup_steps = int(total * settings.warmup)
        if step < warmup_steps:
            frac = step / warmup_steps
            return settings.start_factor * (1 - frac) + 1.0 * frac
        frac = (step - warmup_steps) / (total - warmup_steps)
        return 1.0 * (1 - frac) + settings.final_factor * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing, reduction="none")
    slow = {k: v.clone() for k, v in net.state_dict().items()} if settings.lookahead_every else None

    def lookahead(decay):
        for slow_value, value in zip(slow.values(), net.state_dict().values()):
            if value.dtype.is_floating_point:
                slow_value.lerp_(value, 1 - decay)
                value.copy_(slow_value)

    pad = settings.translate
    base = images
    if settings.flip:
        mask = draws.flip_mask(len(images)).view(-1, 1, 1, 1)
        base = torch.where(mask, images.flip(-1), images)
    padded = F.pad(base, (pad,) * 4, "reflect") if pad else base
    losses, step = [], 0
    net.train()
    for epoch in range(math.ceil(total / per_epoch)):
        net[0].bias.requires_grad = epoch < settings.whiten_bias_epochs
        epoch_images = _crop(padded, draws.shifts(epoch, len(images), pad), images.shape[-1], pad) if pad else base
        if settings.flip and epoch % 2 == 1:
            epoch_images = epoch_images.flip(-1)
        if channels_last:
            epoch_images = epoch_images.contiguous(memory_format=torch.channels_last)
        order = draws.order(epoch, len(images))
        for i in range(per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            loss = loss_fn(net(epoch_images[rows]), labels[rows]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
            step += 1
            if slow is not None and step % settings.lookahead_every == 0:
                lookahead(_lookahead_decay(step, total))
            if step >= total:
                break
    if slow is not None:
        lookahead(1.0)  # the fast weights take the slow ones
    return losses


def evaluate(net, images, tta_level=2, batch_size=2000) -> torch.Tensor:
    """Logits of ``images`` with test-time augmentation (batchnorm on its running statistics)."""

    def mirror(x):
        return 0.5 * net(x) + 0.5 * net(x.flip(-1))

    def mirror_translate(x):
        padded = F.pad(x, (1,) * 4, "reflect")
        h, w = x.shape[-2:]
        translated = [mirror(padded[:, :, 0:h, 0:w]), mirror(padded[:, :, 2 : h + 2, 2 : w + 2])]
        return 0.5 * mirror(x) + 0.5 * torch.stack(translated).mean(0)

    infer = [net, mirror, mirror_translate][tta_level]
    net.eval()
    with torch.no_grad():
        return torch.cat([infer(x) for x in images.split(batch_size)])


def fast94_torch(train_images, train_labels, test_images, test_labels, settings: Fast94Settings, seed=0,
                 dtype=torch.float32, channels_last=False) -> Fast94Result:  # fmt: skip
    """One timed run (whitening, training, evaluation with TTA) on normalised images already on the device.

    ``dtype=torch.float16`` with ``channels_last=True`` is the published setting (batchnorm
    kept in float32)."""
    device = train_images.device
    torch.manual_seed(seed)
    net = make_net(settings, dtype, device)
    if dtype == torch.float16:
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.float()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
    train_x, test_x = train_images.to(dtype), test_images.to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    init_whitening(typing.cast(nn.Conv2d, net[0]), train_x[: settings.whiten_images], settings.whiten_eps)
    sync()
    whitened = time.perf_counter()
    losses = train(net, train_x, train_labels, settings, TorchDraws(seed, device), channels_last)
    sync()
    trained = time.perf_counter()
    logits = evaluate(net, test_x.contiguous(memory_format=torch.channels_last) if channels_last else test_x,
                      settings.tta_level)  # fmt: skip
    accuracy = (logits.argmax(1) == test_labels).float().mean().item()
    end = time.perf_counter()
    losses = [float(v) for v in torch.stack(losses).cpu()]
    return Fast94Result.from_clock(
        accuracy, (start, whitened, trained, end), len(train_x) // settings.batch_size, losses, net, settings
    )
