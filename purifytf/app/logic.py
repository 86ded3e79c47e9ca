"""The web app's page logic, without Gradio: prepare an image, attack it, purify it, format the results.

Every function here is pure Python and torch (unit-testable without a browser); :mod:`purifytf.app.page`
only lays these out. :func:`handle` is what the page's button calls: it returns the HTML of the results,
or of a message for bad input, never a stack trace.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ..attacks import pgd_eot
from ..base import Purifier
from ..data import to_8bit
from ..defended import DefendedModel
from ..factory import default_defences, defence_table
from ..nfe import count_nfe
from ..purifiers.saliency_diffpure import SaliencyDiffPurify
from ..purifiers.ssni import SSNIPurify

__all__ = ["ATTACKS", "BARE_CLASSIFIER", "CLASS_NAMES", "DEFAULT_PURIFIERS", "EOT_MAX", "EPS_MAX", "MAX_UPLOAD_BYTES",
           "MAX_UPLOAD_PIXELS", "SOURCES", "STEPS_MAX", "AppInputError", "AttackRequest", "Models", "Prepared",
           "Result", "bundled_image", "format_error", "format_results", "handle", "purifier_names", "purify",
           "read_upload", "run_attack", "run_page", "top_k"]

log = logging.getLogger(__name__)

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
"""Fashion-MNIST's labels, in the order of the bundled classifier's logits."""

SOURCES = ("bundled test image", "upload")
ATTACKS = ("none", "PGD-EOT Linf", "PGD-EOT L2")
BARE_CLASSIFIER = "bare classifier (transfer)"
EPS_MAX = {"PGD-EOT Linf": 0.25, "PGD-EOT L2": 10.0}
"""Largest radius accepted per attack (images in [0, 1]; Linf 0.25 is about 64/255)."""
STEPS_MAX = 100
EOT_MAX = 32
ATTACK_CALLS_MAX = 5_000
"""Network calls an adaptive attack may make (steps x EOT x the target's NFE): a few minutes on a CPU."""
EOT_BATCH = 4
"""EOT samples differentiated together: bounds an adaptive attack's memory."""
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
DEFAULT_PURIFIERS = ("DiffPurify (t*=0.1, 10 steps)", "SaliencyDiffPurify", "SSNIPurify (on DiffPurify)", "IMPurify",
                     "JPEGPurify (q=75)")

Progress = Callable[..., object]
"""``progress(fraction, desc=...)``: what ``gr.Progress`` is; the page shows it during the attack."""


class AppInputError(ValueError):
    """Bad input from the page: its message is shown to the person instead of results."""


def purifier_names() -> list[str]:
    """Every defence of the shared table (:func:`purifytf.factory.defence_table`), in table order."""
    return [name for name, (variant, _) in defence_table().items() if variant is not None]


class Models:
    """The embedded Fashion-MNIST default: classifier, test slice and the purifiers (built on first use).

    Args:
        device: where the models run (default: CUDA when available).
    """

    def __init__(self, device: str | torch.device | None = None):
        from ..classifiers import fashion_mnist_cnn
        from ..evaluation.data import load_dataset

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.classifier = fashion_mnist_cnn(pretrained=True).to(self.device)
        data = load_dataset("bundled:fashion-mnist")
        self.images, self.labels = data.images, data.labels
        self.channels, self.size = self.images.shape[1], tuple(self.images.shape[-2:])
        self._purifiers: dict[str, Purifier] = {}
        self.lock = threading.Lock()  # one computation at a time: the global RNG is forked and seeded

    def purifier(self, name: str) -> Purifier:
        """The defence ``name`` of :func:`purifier_names`, built once."""
        if name not in self._purifiers:
            if name not in purifier_names():
                raise AppInputError(f"unknown purifier {name!r}; choose from {purifier_names()}")
            built = default_defences([name], classifier=self.classifier)[name]
            self._purifiers[name] = built.to(self.device)
        return self._purifiers[name]


@dataclass
class Prepared:
    """An image ready for the models: ``image`` (1, C, H, W) in [0, 1], its label (``None``: unknown) and how
    it was obtained (shown on the page)."""

    image: Tensor
    label: int | None
    note: str


def _integer(name: str, value, low: int, high: int) -> int:
    """``value`` (a number from the page) as an int in [low, high]; otherwise an :class:`AppInputError`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value != int(value) or not low <= value <= high:
        raise AppInputError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def bundled_image(models: Models, index: int | float | None) -> Prepared:
    """Bundled test image ``index`` (0 to N - 1) with its true label."""
    i = _integer("bundled test image number", index, 0, len(models.images) - 1)
    label = int(models.labels[i])
    note = (f"bundled Fashion-MNIST test image #{i} ({CLASS_NAMES[label]}), {models.size[0]}x{models.size[1]} "
            f"grey: used as is")
    return Prepared(models.images[i: i + 1].clone(), label, note)


def read_upload(path: str | Path | None, channels: int, size: tuple[int, int]) -> Prepared:
    """An uploaded image file, grey or RGB of any size, as ``channels`` channels at ``size`` (H, W).

    Conversion: to grey by ITU-R 601-2 luma (``channels=1``) or to RGB (``channels=3``, grey copied to
    every channel; transparency dropped), centre crop to a square, antialiased bilinear resize. The label is
    unknown (``None``). Raises :class:`AppInputError` for no file, an empty or unreadable file, a file over
    :data:`MAX_UPLOAD_BYTES` or an image over :data:`MAX_UPLOAD_PIXELS`.
    """
    if path is None or str(path) == "":
        raise AppInputError("no file uploaded: upload an image, or choose a bundled test image")
    path = Path(path)
    nbytes = path.stat().st_size
    if nbytes == 0:
        raise AppInputError(f"the uploaded file {path.name!r} is empty")
    if nbytes > MAX_UPLOAD_BYTES:
        raise AppInputError(f"the uploaded file is {nbytes / 2**20:.1f} MB; the limit is "
                            f"{MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise AppInputError(f"the image is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels "
                                    f"(e.g. 4096x4096)")
            mode = image.mode
            converted = to_8bit(image, grey=channels == 1)
    except AppInputError:
        raise
    except (PIL.Image.DecompressionBombError, PIL.UnidentifiedImageError, OSError, ValueError) as error:
        raise AppInputError(f"{path.name!r} is not an image this page can read (PNG, JPEG, BMP, GIF, WebP, TIFF): "
                            f"{error}") from None
    x = TF.to_dtype(TF.pil_to_tensor(converted), torch.float32, scale=True)
    side = min(width, height)
    x = TF.resize(TF.center_crop(x, [side, side]), list(size), antialias=True).clamp(0, 1)
    target = "grey (ITU-R 601-2 luma)" if channels == 1 else "RGB"
    note = (f"uploaded {width}x{height} {mode} image -> {target}, centre-cropped to {side}x{side}, resized to "
            f"{size[0]}x{size[1]} (bilinear, antialiased); no label: the attack uses the classifier's clean prediction")
    return Prepared(x.unsqueeze(0), None, note)


@dataclass(frozen=True)
class AttackRequest:
    """What the page asks: ``kind`` of :data:`ATTACKS`, radius ``eps`` (images in [0, 1]), ``steps``, ``eot``
    samples, and ``target``: :data:`BARE_CLASSIFIER` or the name of the purifier attacked adaptively."""

    kind: str = "PGD-EOT Linf"
    eps: float = 8 / 255
    steps: int = 10
    eot: int = 1
    target: str = BARE_CLASSIFIER

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise AppInputError(f"attack must be one of {list(ATTACKS)}, got {self.kind!r}")
        if self.kind == "none":
            return
        limit = EPS_MAX[self.kind]
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps <= limit:
            raise AppInputError(f"eps for {self.kind} must be in (0, {limit}] (images in [0, 1]; 8/255 = 0.0314), "
                                f"got {self.eps}")
        _integer("steps", self.steps, 1, STEPS_MAX)
        _integer("EOT samples", self.eot, 1, EOT_MAX)
        if self.target != BARE_CLASSIFIER and self.target not in purifier_names():
            raise AppInputError(f"attack target must be {BARE_CLASSIFIER!r} or a purifier of {purifier_names()}, "
                                f"got {self.target!r}")

    @property
    def step(self) -> float:
        """Step size: 2.5 eps / steps (Madry et al.)."""
        return 2.5 * self.eps / self.steps

    def describe(self) -> str:
        if self.kind == "none":
            return "none: the adversarial image is the clean one"
        radius = f"eps {self.eps:.4g}" + (f" ({self.eps * 255:.3g}/255)" if self.kind.endswith("Linf") else "")
        view = "the bare classifier" if self.target == BARE_CLASSIFIER else f"adaptive, through {self.target}"
        return (f"{self.kind}, {radius}, {int(self.steps)} steps of {self.step:.3g}, {int(self.eot)} EOT samples, "
                f"random start, against {view}")


class _Reporting(nn.Module):
    """``model`` that reports each forward call (one per PGD step) as progress."""

    def __init__(self, model: nn.Module, steps: int, progress: Progress):
        super().__init__()
        self.model, self.steps, self.progress, self.calls = model, steps, progress, 0

    @property
    def deterministic(self) -> bool:
        """The wrapped model's (:func:`purifytf.attacks.is_deterministic`: one pass per gradient if so)."""
        return self.model.deterministic

    def forward(self, x: Tensor) -> Tensor:
        self.progress(self.calls / self.steps, desc=f"attack: step {self.calls + 1} of {self.steps}")
        self.calls += 1
        return self.model(x)


def run_attack(models: Models, x: Tensor, label: int, request: AttackRequest, seed: int,
               progress: Progress | None = None) -> Tensor:
    """Adversarial version (1, C, H, W) of ``x`` for ``label``; the RNG is seeded with ``seed``."""
    if request.kind == "none":
        return x.clone()
    purifier = None if request.target == BARE_CLASSIFIER else models.purifier(request.target)
    model = DefendedModel(purifier, models.classifier, normalize=None)
    if progress is not None:
        model = _Reporting(model, int(request.steps), progress)
    torch.manual_seed(seed)  # the purifier's noise inside the attack (global RNG)
    generator = torch.Generator(x.device).manual_seed(seed)
    return pgd_eot(model, x, torch.tensor([label], device=x.device), norm=request.kind.rsplit(" ", 1)[1],
                   eps=request.eps, step=request.step, steps=int(request.steps), eot=int(request.eot),
                   eot_batch=EOT_BATCH, generator=generator)


def check_attack_cost(models: Models, request: AttackRequest, x: Tensor) -> None:
    """Refuse an adaptive attack of more than :data:`ATTACK_CALLS_MAX` network calls (the target's NFE is
    counted on one purification of ``x``)."""
    if request.kind == "none" or request.target == BARE_CLASSIFIER:
        return
    with torch.no_grad(), count_nfe() as calls:
        models.purifier(request.target).purify(x, torch.Generator(x.device).manual_seed(0))
    steps, eot = int(request.steps), int(request.eot)
    cost = steps * eot * calls.count
    if cost > ATTACK_CALLS_MAX:
        raise AppInputError(f"this attack makes {cost:,} network calls ({steps} steps x {eot} EOT samples x "
                            f"{calls.count} of {request.target}); the page allows {ATTACK_CALLS_MAX:,}: lower the "
                            "steps or EOT samples, or attack a faster purifier")


@torch.no_grad()
def top_k(classifier: nn.Module, x: Tensor, k: int = 3) -> list[tuple[str, float]]:
    """The classifier's ``k`` most probable labels of one image (1, C, H, W), with probabilities."""
    probabilities = classifier(x).softmax(-1)[0]
    values, indices = probabilities.topk(k)
    return [(CLASS_NAMES[i], float(p)) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]


@dataclass
class Result:
    """One column of the page: an image (1, C, H, W) in [0, 1], the classifier's top 3 on it, and facts."""

    title: str
    image: Tensor
    top3: list[tuple[str, float]]
    facts: dict[str, str] = field(default_factory=dict)
    mask: Tensor | None = None


@torch.no_grad()
def purify(models: Models, name: str, x: Tensor, seed: int) -> Result:
    """Purify ``x`` with the defence ``name`` under a generator seeded with ``seed``."""
    purifier = models.purifier(name)
    generator = torch.Generator(x.device).manual_seed(seed)
    start = time.perf_counter()
    out = purifier.purify(x, generator)
    seconds = time.perf_counter() - start
    facts = {"NFE": str(purifier.last_nfe), "seconds": f"{seconds:.3f}"}
    if isinstance(purifier, SSNIPurify):
        facts["SSNI t"] = f"{int(purifier.last_t[0])} steps"
    mask = None
    if isinstance(purifier, SaliencyDiffPurify):
        mask = purifier.compute_mask(x).float()
    return Result(name, out, top_k(models.classifier, out), facts, mask)


def run_page(models: Models, source: str, index, upload, attack: str, eps, steps, eot, target: str,
             purifiers: Sequence[str], seed, progress: Progress | None = None) -> tuple[list[Result], list[str]]:
    """Everything the page computes: the results (clean, adversarial, each purified image) and notes."""
    if source not in SOURCES:
        raise AppInputError(f"image source must be one of {list(SOURCES)}, got {source!r}")
    if not purifiers:
        raise AppInputError("choose at least one purifier to compare")
    seed = _integer("seed", seed, 0, 2**31 - 1)
    unknown = [name for name in purifiers if name not in purifier_names()]
    if unknown:
        raise AppInputError(f"unknown purifiers {unknown}; choose from {purifier_names()}")
    request = AttackRequest(attack, eps, steps, eot, target)
    prepared = (bundled_image(models, index) if source == SOURCES[0] else
                read_upload(upload, models.channels, models.size))
    x = prepared.image.to(models.device)
    with models.lock, torch.random.fork_rng(devices=[models.device] if models.device.type == "cuda" else []):
        check_attack_cost(models, request, x)
        clean = Result("clean", x, top_k(models.classifier, x))
        label = prepared.label if prepared.label is not None else CLASS_NAMES.index(clean.top3[0][0])
        clean.facts["label"] = CLASS_NAMES[prepared.label] if prepared.label is not None else "unknown"
        adversarial = run_attack(models, x, label, request, seed, progress)
        results = [clean, Result("adversarial", adversarial, top_k(models.classifier, adversarial),
                                 {"attack": request.kind})]
        for i, name in enumerate(purifiers):
            if progress is not None:
                progress(i / len(purifiers), desc=f"purifying: {name}")
            results.append(purify(models, name, adversarial, seed))
    notes = [f"image: {prepared.note}", f"attack: {request.describe()}", f"seed: {seed}"]
    return results, notes


def _png(image: Tensor) -> str:
    """(1, C, H, W) in [0, 1] -> a PNG data URL."""
    array = (image[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    TF.to_pil_image(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _card(result: Result) -> str:
    labels = "".join(f'<li><span class="label">{html.escape(name)}</span> '
                     f'<span class="prob">{100 * p:.1f} %</span></li>' for name, p in result.top3)
    facts = "".join(f"<div>{html.escape(k)}: <b>{html.escape(v)}</b></div>" for k, v in result.facts.items())
    mask = ("" if result.mask is None else
            f'<div class="mask"><img alt="saliency mask" src="{_png(result.mask)}"><div>saliency mask</div></div>')
    return (f'<div class="purify-card"><div class="title">{html.escape(result.title)}</div>'
            f'<img alt="{html.escape(result.title)}" src="{_png(result.image)}"><ol class="top3">{labels}</ol>'
            f'<div class="facts">{facts}</div>{mask}</div>')


STYLE = ("<style>.purify-results{display:flex;flex-wrap:wrap;gap:12px}.purify-card{width:150px;font-size:12px}"
         ".purify-card img{width:140px;height:140px;image-rendering:pixelated;border:1px solid #888}"
         ".purify-card .mask img{width:70px;height:70px}"
         ".purify-card .title{font-weight:bold;height:2.8em;overflow:hidden}"
         ".purify-card ol{padding-left:1.2em;margin:4px 0}.app-error{color:#b00020;font-weight:bold}"
         ".purify-notes{font-size:12px}</style>")


def format_results(results: Sequence[Result], notes: Sequence[str]) -> str:
    """The HTML of the results: one card per column, side by side, then the notes."""
    cards = "".join(_card(r) for r in results)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f'{STYLE}<div class="purify-results">{cards}</div><ul class="purify-notes">{notes_html}</ul>'


def format_error(message: str) -> str:
    """The HTML of a message for bad input."""
    return f'{STYLE}<div class="app-error" role="alert">{html.escape(message)}</div>'


def handle(models: Models, *inputs, progress: Progress | None = None) -> str:
    """:func:`run_page` then :func:`format_results`; bad input (and any failure) becomes a message, with the
    traceback only in the server's log."""
    try:
        return format_results(*run_page(models, *inputs, progress=progress))
    except AppInputError as error:
        return format_error(str(error))
    except Exception as error:  # the page shows a message, the server log keeps the traceback
        log.exception("purifytf app: the computation failed")
        return format_error(f"the computation failed ({type(error).__name__}: {error})")
