"""Image processor class for ALBEF."""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    infer_channel_dimension_format,
    is_pil_image,
)
from transformers.utils import is_numpy_array, is_torch_tensor


class AlbefImageProcessor(PilBackend):
    r"""
    ALBEF's evaluation transform: convert to RGB, resize to a `size` x `size` square with PIL bicubic
    interpolation (aspect ratio not kept, no crop), rescale by 1/255, normalise with the CLIP mean and std.

    It is PIL-backed on purpose: PIL's bicubic filter is the one ALBEF was trained and evaluated with, and
    this class reproduces the original `torchvision` transform on PIL images exactly. Tensor-based bicubic
    resizing (transformers' torchvision backend) differs by 0.015 to 0.3 after normalisation on the reference
    images, so there is no torchvision variant.

    Fine-tuned ALBEF checkpoints use `size=384` (the default); the pre-trained ones use `size=256`.

    Example:

    ```python
    >>> from transformers_albef import AlbefImageProcessor

    >>> image_processor = AlbefImageProcessor(size=256)
    >>> pixel_values = image_processor(image, return_tensors="pt").pixel_values  # (1, 3, 256, 256)
    ```
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 384, "width": 384}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """
        Flattens the input into a list of single images. A 4-D array is a batch, a (H, W) array is one
        grayscale image, and nested lists (e.g. NLVR2 image pairs) are flattened in order.
        """
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("AlbefImageProcessor got an empty list of images.")
            images = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        else:
            images = [images]

        flat_images = []
        for image in images:
            if isinstance(image, str):
                image = self.fetch_images(image)
            if is_pil_image(image):
                flat_images.append(image)
            elif not (is_numpy_array(image) or is_torch_tensor(image)):
                raise ValueError(
                    "AlbefImageProcessor expects PIL images, numpy arrays, torch tensors or image paths/URLs, "
                    f"got {type(image).__name__}."
                )
            elif image.ndim in (2, 3):
                flat_images.append(image)
            elif image.ndim == 4:
                flat_images.extend(image)
            else:
                raise ValueError(
                    "AlbefImageProcessor expects arrays of shape (H, W), (H, W, C), (C, H, W) or a batch "
                    f"(B, H, W, C) / (B, C, H, W), got shape {tuple(image.shape)}."
                )
        if not flat_images:
            raise ValueError("AlbefImageProcessor got an empty list of images.")
        return flat_images

    def process_image(self, image: ImageInput, input_data_format=None, **kwargs) -> np.ndarray:
        """Checks the channel count of one image and converts it to a channels-first array."""
        if not is_pil_image(image) and image.ndim == 3 and input_data_format is None:
            try:
                input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
            except ValueError:
                raise ValueError(
                    "AlbefImageProcessor expects images with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, "
                    f"first or last, got an array of shape {tuple(image.shape)}."
                ) from None
        return super().process_image(image, input_data_format=input_data_format, **kwargs)

    def _preprocess(self, images: list[np.ndarray], do_rescale: bool, **kwargs):
        """Refuses images that would silently give wrong pixels, then runs the transform."""
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            if height == 0 or width == 0:
                raise ValueError(f"image {index} is {height}x{width} pixels; an image needs at least one pixel")
            if np.issubdtype(image.dtype, np.floating):
                if not np.isfinite(image).all():
                    raise ValueError(f"image {index} holds NaN or infinite values")
                if do_rescale and image.size and float(image.max()) <= 1.0 and float(image.max()) > 0.0:
                    raise ValueError(
                        f"image {index} is a float image with values in [0, 1], which do_rescale=True would divide by "
                        "255 again: pass do_rescale=False, or uint8 / [0, 255] values"
                    )
        return super()._preprocess(images, do_rescale=do_rescale, **kwargs)

    def convert_to_rgb(self, image, input_data_format=None) -> np.ndarray:
        """
        Converts to 3-channel RGB the way `PIL.Image.convert("RGB")` does: alpha is dropped, not composited
        onto white as the transformers default does, because ALBEF's datasets call `.convert("RGB")`.
        PIL images come back as (H, W, 3) arrays, arrays keep their channel layout.
        """
        if isinstance(image, PIL.Image.Image):
            return np.array(image.convert("RGB"))
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=-1)
        channel_axis = 0 if input_data_format == ChannelDimension.FIRST else -1
        num_channels = image.shape[channel_axis]
        if num_channels == 1:
            return np.repeat(image, 3, axis=channel_axis)
        return np.take(image, [0, 1, 2], axis=channel_axis)


AlbefImageProcessor.register_for_auto_class()  # saved image processors name their code (auto_map)


__all__ = ["AlbefImageProcessor"]
