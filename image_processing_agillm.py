# Copyright 2025 The AGILLM authors. Licensed under the Apache License, Version 2.0.
"""Image processor for AGILLM: resize -> rescale -> normalise into `pixel_values` [B, 3, H, W].

Modeled on transformers' ViT processor (`image_processing_pil_vit.py`): the PIL/NumPy backend does the work, so the
file needs only numpy and pillow (no torchvision) and travels with a saved model as remote code. What it adds is
input checking with clear errors, and a fixed colour layout: greyscale (e.g. 8x8 digits), RGBA (Twemoji, composited
onto white) and palette images all come out as RGB.
"""

import numpy as np
import torch

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    get_image_type,
)


# Channel counts an image may arrive with: greyscale, RGB, RGBA.
SUPPORTED_NUM_CHANNELS = (1, 3, 4)


class AgillmImageProcessor(PilBackend):
    r"""
    Turns PIL images, NumPy arrays (HWC or CHW, integer 0-255 or float 0-1) or torch tensors, single or batched,
    into `pixel_values` of shape [batch, 3, height, width] (float32). A 3-D array is one image (as everywhere in
    transformers); pass a batch of greyscale images as a list of [H, W] arrays or as one [B, H, W, 1] array.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 32, "width": 32}`): output size.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`): filter used when resizing.
        do_resize, do_rescale, do_normalize (`bool`, *optional*, default `True`): pipeline steps.
        do_convert_rgb (`bool`, *optional*, defaults to `True`): grey / RGBA / palette -> RGB; with `False` the
            input's own channels are kept.
        rescale_factor (`float`, *optional*, defaults to `1/255`): multiplies integer pixel values. Float images are
            taken as already in [0, 1] and are not rescaled again.
        image_mean, image_std (`list[float]`, *optional*, default `[0.5] * 3`): per-channel normalisation, so
            pixel values end up in [-1, 1].
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 32, "width": 32}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        if images is None or (isinstance(images, list | tuple) and len(images) == 0):
            raise ValueError("AgillmImageProcessor got an empty batch: pass at least one image")
        if isinstance(images, np.ndarray | torch.Tensor):
            _check_array_rank(images.ndim, allowed=(2, 3, 4), what="an image or a batch of images")
            if images.ndim == 4 and images.shape[0] == 0:
                raise ValueError("AgillmImageProcessor got an empty batch: pass at least one image")
            images = _with_channel_axis(images)
        elif isinstance(images, list | tuple):
            images = [_with_channel_axis(image) for image in images]
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        image_type = get_image_type(image)
        if image_type == ImageType.PIL and 0 in image.size:
            raise ValueError(f"AgillmImageProcessor got an empty image (size {image.size}): images need pixels")
        if image_type == ImageType.TORCH:
            image = image.detach().cpu().numpy()
            image_type = ImageType.NUMPY
        if image_type == ImageType.NUMPY:
            _check_array_rank(image.ndim, allowed=(2, 3), what="each image")
            if image.ndim == 2:  # H, W greyscale: give it a channel axis so every array goes the same way
                image, input_data_format = image[None], ChannelDimension.FIRST
            input_data_format = input_data_format or _channel_layout(image.shape)
            spatial = image.shape[1:] if input_data_format == ChannelDimension.FIRST else image.shape[:-1]
            if 0 in spatial:  # resizing would invent a whole image out of nothing
                raise ValueError(f"AgillmImageProcessor got an empty image (shape {tuple(image.shape)}): images need "
                                 "pixels")
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format,
                                     **kwargs)

    def rescale(self, image: np.ndarray, scale: float, **kwargs) -> np.ndarray:
        # Float inputs follow the usual [0, 1] convention: multiplying them by 1/255 again would crush them to ~0.
        if np.issubdtype(image.dtype, np.floating):
            return image.astype(np.float32)
        return super().rescale(image, scale, **kwargs).astype(np.float32)


def _with_channel_axis(image):
    """[H, W] greyscale arrays get a leading channel axis: transformers' batching helper only knows 3-D images."""
    if isinstance(image, np.ndarray | torch.Tensor) and image.ndim == 2:
        return image[None]
    return image


def _check_array_rank(ndim: int, allowed: tuple[int, ...], what: str) -> None:
    if ndim not in allowed:
        raise ValueError(f"AgillmImageProcessor expects {what} with {' or '.join(map(str, allowed))} dimensions, "
                         f"got {ndim}")


def _channel_layout(shape: tuple[int, ...]) -> ChannelDimension:
    """CHW or HWC from the axis holding 1, 3 or 4 channels; channels-first wins when both fit (e.g. 3x3x3)."""
    if shape[0] in SUPPORTED_NUM_CHANNELS:
        return ChannelDimension.FIRST
    if shape[-1] in SUPPORTED_NUM_CHANNELS:
        return ChannelDimension.LAST
    raise ValueError(f"AgillmImageProcessor expects 1 (grey), 3 (RGB) or 4 (RGBA) channels on the first or last "
                     f"axis, got an image of shape {tuple(shape)}")


AgillmImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["AgillmImageProcessor"]
