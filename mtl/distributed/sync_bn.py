"""A model trained by several processes: BatchNorm over the global batch (synchronised BN) and
the DistributedDataParallel wrapper that the training loop calls."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtl.distributed.ranks import is_distributed


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to call in the training loop: ``model`` itself in one process; else ``model``
    with synchronised BatchNorm (converted in place), wrapped in DistributedDataParallel.

    Parameters are shared, not copied: an optimiser built on ``model.parameters()`` afterwards,
    and ``model.state_dict()``, are the same as in one process (BN state keys are unchanged).
    """
    if not is_distributed():
        return model
    sync_batchnorm_(model, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batchnorm_(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the statistics of the global batch.

    On GPUs: torch's ``nn.SyncBatchNorm``. Its kernels exist only for CUDA-like devices, so on the
    CPU (gloo; tests, CPU clusters) each ``BatchNorm2d`` becomes :class:`AllReduceBatchNorm2d`,
    the same computation written with all-reduces. Modules are replaced in place; parameters and
    buffers are shared with the originals.
    """
    if device.type == "cuda":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        converted = _convert_batchnorm2d(model)
    if converted is not model:
        raise ValueError("sync_batchnorm_ needs a model whose top module is not itself a BatchNorm")
    return model


def _convert_batchnorm2d(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        converted = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats)
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_batchnorm2d(child))
    return module


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: every rank's loss depends on the sum, so the gradient that
    flows back to each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the batch summed over all ranks.

    Same mean, biased variance for normalising and unbiased variance for the running estimate as
    ``nn.BatchNorm2d`` on the concatenated batch. One all-reduce per layer and direction carries
    the per-channel sums of x and x^2 (and the count), in float64 so that E[x^2] - E[x]^2 keeps
    float32 accuracy. A rank with an empty part contributes zeros. Outside training, or in one
    process, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims, channels = (0, 2, 3), x.shape[1]
        wide = x.double()
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_full((1,), x.numel() // channels)])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach().to(x.dtype), var.detach().to(x.dtype), count.item())
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        out = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)
