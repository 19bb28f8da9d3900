"""Image-classification data for ViT: Fashion-MNIST from its IDX files through a local tfds
builder (no TensorFlow needed), tfds datasets by name, synthetic images for tests, and
resumable per-process batches with seeded pad-and-crop and horizontal-flip augmentation.

    examples = fashion_mnist_examples(local_dataset("fashion-mnist"), "data", "train")  # $ZOO_DATA_DIR/fashion-mnist
    train = ImagePipeline(examples, global_batch=256, seed=0, image_size=28, channels=1,
                          mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    batch = train.batch_at(step)    # {"image": float32 [256, 28, 28, 1], "label": int32 [256]}

Local data sets are found by name in one folder, named by the environment variable ZOO_DATA_DIR
(`local_dataset`): $ZOO_DATA_DIR/fashion-mnist holds the four IDX files, for example. Nothing
else is searched: other data comes from flags or from tfds by name.

Batch k is a pure function of (seed, k, process), augmentation included: each example's crop and
flip come from a hash of (seed, its position in the stream), so restarting at step k, or
splitting the global batch over processes, gives the same examples, augmented the same way.

A batch is read, decoded, augmented and normalised in `workers` slices at once, on threads of a
stdlib `concurrent.futures` pool: PIL's decoders and resizing, and numpy on whole arrays, release
the GIL, so threads use several cores without copying images between processes. grain would bring
worker processes and its own prefetching, which the loop's prefetcher already does; slicing one
batch over a thread pool is all that is needed. The slices are cut after the positions are drawn,
so a batch is the same for any number of workers.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from zoo.data.text import HASH_AUGMENT, StepPipeline, hash64, read_records, records

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # of the training images scaled to [0, 1]
DECODE_WORKERS = min(8, os.cpu_count() or 1)  # threads that build one batch
DATA_ENV = "ZOO_DATA_DIR"  # the folder of local data sets, each in a subfolder by name


def local_dataset(name: str) -> pathlib.Path | None:
    """$ZOO_DATA_DIR/`name` if that folder exists (None where it does not or the variable is unset)."""
    root = os.environ.get(DATA_ENV)
    folder = pathlib.Path(root, name) if root else None
    return folder if folder and folder.is_dir() else None


def tfds_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether tfds's dataset `name` is built in `data_dir` already (readable with no download)."""
    return tfds.builder(name, data_dir=data_dir).is_prepared()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as an array: big-endian header, magic 0x0000TTNN (type, rank), dims."""
    data = pathlib.Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()}; images 00000803, labels 00000801)")
    rank = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    body = data[4 + 4 * rank :]
    if len(body) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says {shape} of {dtype} ({dtype.itemsize * int(np.prod(shape))} bytes), "
            f"the file holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, 1] and labels int64 [N] from an IDX pair (magics 2051 and 2049)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} and {labels_path} hold shapes {images.shape} and {labels.shape}; "
            f"expected [N, H, W] images and [N] labels"
        )
    return images[..., None], labels.astype(np.int64)


class LocalFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from the four original gzipped IDX files (manual_dir), stored as uint8 tensors."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"The four Fashion-MNIST IDX files: {sorted(sum(FASHION_MNIST_FILES.values(), ()))}."

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),  # Image() would need TensorFlow
                "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, features=features, supervised_keys=("image", "label"), disable_shuffling=True
        )  # the IDX files' order

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        folder = pathlib.Path(dl_manager.manual_dir)
        missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing}")
        return {
            split: self._generate_examples(folder / images, folder / labels)
            for split, (images, labels) in FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path: pathlib.Path, labels_path: pathlib.Path) -> Any:
        images, labels = read_idx_pair(images_path, labels_path)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


def build_fashion_mnist(source_dir: str | os.PathLike, data_dir: str | os.PathLike) -> LocalFashionMnist:
    """Build (once; later calls reuse it) Fashion-MNIST from its IDX files in `source_dir` into `data_dir`."""
    builder = LocalFashionMnist(data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir)))
    return builder


class ArrayExamples:
    """Images uint8 [N, H, W, C] and labels [N] held in memory (or memory-mapped)."""

    def __init__(self, images: Any, labels: Any):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) at `indices`."""
        return np.asarray(self.images[indices]), np.asarray(self.labels[indices])


class SourceExamples:
    """A tfds image data source read on demand, each image resized to `image_size` (for ImageNet-sized sets)."""

    def __init__(
        self, source: Any, image_size: int | tuple[int, int], image_key: str = "image", label_key: str = "label"
    ):
        self.source, self.size, self.image_key, self.label_key = source, _pair(image_size), image_key, label_key
        self.channels = np.shape(read_records(source, [0])[0][image_key])[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.source), *self.size, self.channels)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images resized to image_size, labels) at `indices`."""
        batch = read_records(self.source, indices)
        return (
            np.stack([fit_image(record[self.image_key], self.size) for record in batch]),
            np.asarray([record[self.label_key] for record in batch]),
        )


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 [h, w, C] so it covers `size` (height, width), keeping its aspect, then centre-crop to it."""
    if image.shape[:2] == size:
        return image
    height, width = image.shape[:2]
    scale = max(size[0] / height, size[1] / width)
    resized_height, resized_width = max(size[0], round(height * scale)), max(size[1], round(width * scale))
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((resized_width, resized_height), PIL.Image.BILINEAR)).reshape(
        resized_height, resized_width, image.shape[-1]
    )
    top, left = (resized_height - size[0]) // 2, (resized_width - size[1]) // 2
    return resized[top : top + size[0], left : left + size[1]]


def load_examples(source: Any, image_key: str = "image", label_key: str = "label") -> ArrayExamples:
    """A tfds data source of same-size images read whole into memory."""
    images, labels = [], []
    for record in records(source):
        images.append(record[image_key])
        labels.append(record[label_key])
    shapes = sorted({np.shape(image) for image in images})
    if len(shapes) > 1:
        raise ValueError(
            f"the images have {len(shapes)} different shapes (e.g. {shapes[:3]}): "
            f"read them with SourceExamples(source, image_size), which resizes them"
        )
    return ArrayExamples(np.stack(images), np.asarray(labels, np.int64))


def fashion_mnist_examples(source_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str) -> ArrayExamples:
    """Fashion-MNIST `split` ("train" or "test") through the local tfds build: uint8 [N, 28, 28, 1], labels [N]."""
    return load_examples(build_fashion_mnist(source_dir, data_dir).as_data_source(split))


def tfds_examples(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    download: bool = True,
) -> ArrayExamples | SourceExamples:
    """A tfds image dataset by name, downloaded if needed: whole in memory ("fashion_mnist", "cifar10"),
    or with an image_size read on demand and resized ("imagenet2012", which tfds cannot download for you).
    """
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=download, builder_kwargs={"file_format": "array_record"}
    )
    return load_examples(source) if image_size is None else SourceExamples(source, image_size)


def synthetic_examples(
    n: int, image_size: int | tuple[int, int], channels: int, num_classes: int, seed: int = 0
) -> ArrayExamples:
    """Random uint8 images [n, H, W, C] and labels [n]: a stand-in source for tests."""
    rng = np.random.default_rng(seed)
    return ArrayExamples(
        rng.integers(0, 256, (n, *_pair(image_size), channels), dtype=np.uint8),
        rng.integers(0, num_classes, n).astype(np.int64),
    )


def check_images(shape: Sequence[int], image_size: int | tuple[int, int], channels: int) -> None:
    """Raise unless images of `shape` [N, H, W, C] fit a model taking `image_size` images of `channels` channels."""
    expected = (*_pair(image_size), channels)
    if len(shape) != 4:
        raise ValueError(
            f"images have shape {tuple(shape)}; expected [N, height, width, channels] = [N, {expected}] "
            f"(grayscale images need a channel axis: images[..., None])"
        )
    if tuple(shape[1:]) != expected:
        hint = (
            f"set the model's num_channels={shape[3]} or convert the images"
            if shape[3] != channels
            else "set the model's image_size or resize the images"
        )
        raise ValueError(
            f"images are (height, width, channels) = {tuple(shape[1:])} but the model expects {expected}: {hint}"
        )


class ImagePipeline(StepPipeline):
    """Batches {"image": float32 [local_batch, H, W, C] normalised, "label": int32} with seeded augmentation."""

    def __init__(
        self,
        examples: ArrayExamples | SourceExamples,
        global_batch: int,
        seed: int,
        image_size: int | tuple[int, int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        process_index: int = 0,
        process_count: int = 1,
        augment: bool = True,
        pad: int = 2,
        shuffle: bool = True,
        workers: int = DECODE_WORKERS,
    ):
        check_images(examples.shape, image_size, channels)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({channels})")
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        super().__init__(len(examples), global_batch, seed, process_index, process_count, shuffle)
        self.examples, self.augment, self.pad, self.workers = examples, augment, pad, workers
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="images") if workers > 1 else None

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        indices, keys = self.indices(step), hash64(HASH_AUGMENT, self.seed, self.positions(step))
        slices = np.array_split(np.arange(len(indices)), min(self.workers, len(indices)))
        apply = self._pool.map if self._pool else map
        parts = list(apply(lambda rows: self._examples(indices[rows], keys[rows]), slices))
        return {key: np.concatenate([part[key] for part in parts]) for key in ("image", "label")}

    def _examples(self, indices: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Records `indices` read, augmented by their `keys` and normalised: one slice of a batch."""
        images, labels = self.examples.read(indices)
        if self.augment:
            images = crop_and_flip(images, self.pad, keys)
        return {"image": (images.astype(np.float32) / 255 - self.mean) / self.std, "label": labels.astype(np.int32)}


def crop_and_flip(images: np.ndarray, pad: int, keys: np.ndarray) -> np.ndarray:
    """Zero-pad by `pad`, crop back to size at an offset and flip left-right at a coin, all drawn from `keys`."""
    n, height, width, _ = images.shape
    span = np.uint64(2 * pad + 1)
    top, left = (keys % span).astype(np.int64), ((keys >> np.uint64(16)) % span).astype(np.int64)
    flip = ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    columns = np.where(flip[:, None], np.arange(width)[::-1], np.arange(width)) + left[:, None]
    rows = np.arange(height) + top[:, None]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], columns[:, None, :]]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an int (square) or a pair."""
    return (size, size) if isinstance(size, int) else tuple(size)
