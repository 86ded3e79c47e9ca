"""The training recipes' data sources: :mod:`purifytf.data` (shared with evaluation), under their old path."""

from ..data import (
    FASHION_MNIST_IDX,
    NO_LABEL,
    ArrayData,
    ImageFolderData,
    fashion_mnist,
    load_array,
    open_data,
    read_idx,
    to_images,
    torchvision_dataset,
)

__all__ = ["ArrayData", "FASHION_MNIST_IDX", "ImageFolderData", "NO_LABEL", "fashion_mnist", "load_array", "open_data",
           "read_idx", "to_images", "torchvision_dataset"]
