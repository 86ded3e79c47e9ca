"""Batched robust accuracy under PGD-EOT (Linf or L2): many images per network call, nothing written to disk.

For quick studies (the demo, accuracy-vs-NFE curves); :func:`purifytf.evaluation.evaluate` is the
resumable per-image protocol. Same rule: an image is robust only if its clean prediction is right and
the attack fails.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..attacks import pgd_eot
from ..defended import DefendedModel
from ..nfe import count_nfe

__all__ = ["pgd_eot_accuracy"]


def pgd_eot_accuracy(defended: DefendedModel, x: Tensor, y: Tensor, *, eps: float, steps: int, eot: int = 1,
                     norm: str = "Linf", batch_size: int = 100, seed: int = 0, progress=None) -> dict:
    """Clean and robust accuracy of ``defended`` on images ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,).

    PGD-EOT in the ``norm`` ball of radius ``eps``: step ``2.5 * eps / steps``, random start, ``eot``
    fresh purifications per gradient (1 for an undefended classifier, which is deterministic). The
    global RNG and the start's generator are seeded with ``seed`` first. ``progress`` wraps the batch
    iterator (e.g. ``functools.partial(tqdm, ...)``). Predictions are the defence's vote over its ``runs``.

    Returns ``clean``, ``robust`` (fractions), ``clean_correct``, ``robust_correct`` (N,) bool,
    ``adversarial`` (N, C, H, W), ``nfe`` (network calls per image of one purification) and
    ``seconds_per_image`` (clean pass, attack and robust pass).
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    clean, robust, adversarial = [], [], []
    start = time.perf_counter()
    for xb, yb in progress(batches) if progress is not None else batches:
        correct = defended.predict(xb) == yb
        adv = pgd_eot(defended, xb, yb, norm=norm, eps=eps, step=2.5 * eps / steps, steps=steps,
                      eot=eot, generator=generator)  # a deterministic defence: one pass, whatever eot says
        clean.append(correct)
        robust.append(correct & (defended.predict(adv) == yb))
        adversarial.append(adv)
    seconds = (time.perf_counter() - start) / len(x)
    with torch.no_grad(), count_nfe() as nfe:
        defended.purify(x[:1])
    clean, robust = torch.cat(clean), torch.cat(robust)
    return {"clean": clean.float().mean().item(), "robust": robust.float().mean().item(), "clean_correct": clean,
            "robust_correct": robust, "adversarial": torch.cat(adversarial), "nfe": nfe.count,
            "seconds_per_image": seconds}
