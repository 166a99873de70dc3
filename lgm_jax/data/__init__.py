"""Real data: the dataset registry and the grain pipelines.

    ds = get_dataset("imagenet100", data_dir="~/tensorflow_datasets")
    it = train_iterator(ds, batch_size=1000, seed=0)   # {"image" uint8 [B,256,256,3], "label"}
    for batch in eval_iterator(ds, "test", 256): ...   # {"image" [B,224,224,3], "label", "mask"}

See docs/data.md for preparing each dataset. (The cache of real-image features, which needs the
backbone and the step's augmentation, is `lgm_jax/feature_cache.py`, a layer above.)
"""

from lgm_jax.data.pipeline import (
    eval_iterator,
    load_split_arrays,
    num_eval_batches,
    random_crop,
    read_batch,
    resize_shorter,
    shard_indices,
    skipped_images,
    train_iterator,
)
from lgm_jax.data.sources import (
    IMAGENET100,
    IMAGENET_SUBSETS,
    CorruptImage,
    Dataset,
    DatasetNotPrepared,
    check_num_classes,
    get_dataset,
    image_folder,
    mnist_demo,
)

__all__ = [
    "IMAGENET100",
    "IMAGENET_SUBSETS",
    "CorruptImage",
    "Dataset",
    "DatasetNotPrepared",
    "check_num_classes",
    "eval_iterator",
    "get_dataset",
    "image_folder",
    "load_split_arrays",
    "mnist_demo",
    "num_eval_batches",
    "random_crop",
    "read_batch",
    "resize_shorter",
    "shard_indices",
    "skipped_images",
    "train_iterator",
]
