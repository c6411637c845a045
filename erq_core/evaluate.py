"""Top-1 / top-5 accuracy."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: torch.device | str,
             progress: Optional[Callable[[str, int, int], None]] = None, stage: str = "evaluate") -> dict:
    """{"top1": %, "top5": %, "n": images}. top-5 becomes top-k when there are fewer classes."""
    model.eval()
    correct1 = correct5 = seen = 0
    total = len(loader) if hasattr(loader, "__len__") else 0
    for done, (images, labels) in enumerate(loader, start=1):
        logits = model(images.to(device))
        labels = labels.to(logits.device)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=-1).sum())
        seen += labels.numel()
        if progress:
            progress(stage, done, total)
    if seen == 0:
        return {"top1": None, "top5": None, "n": 0}
    return {"top1": percent(correct1, seen), "top5": percent(correct5, seen), "n": seen}


def percent(correct: int, seen: int) -> float:
    """An accuracy as erq reports it: the share of `seen` images in percent, to 4 decimals."""
    return round(100.0 * correct / seen, 4)
