"""torch.hub entry points of purifytf: each is ``purifytf.create_purifier`` of one method (``purifytf.pretrained``).

>>> purifier = torch.hub.load("purifytf/purifytf", "diff_purify", pretrained=True)  # doctest: +SKIP
>>> classifier = torch.hub.load(repo_dir, "fashion_mnist_cnn", source="local", pretrained=True)  # doctest: +SKIP

Every entry takes ``pretrained``, ``weights`` (``"fashion-mnist"``: the embedded default shipped in the
package; ``"ddpm-cifar10-32"``, ``"guided-diffusion-256-uncond"``: the papers' public backbones, the latter
through ``backbone=`` until its sha256 is recorded: see ``purifytf.pretrained``) and the model's own arguments.
Any named variant: ``purifytf.create_purifier(name)`` (``purifytf.list_purifiers()``).
"""

from purifytf.pretrained import diff_purify, fashion_mnist_cnn, im_purify, saliency_diff_purify, ssni_purify

dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors", "diffusers", "timm", "kornia"]

__all__ = ["diff_purify", "fashion_mnist_cnn", "im_purify", "saliency_diff_purify", "ssni_purify"]
