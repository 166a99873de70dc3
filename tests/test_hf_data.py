"""hf:<path or name> sources (lgm_jax/data/hf.py): tiny `datasets` built here, no network."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

datasets = pytest.importorskip("datasets")

from lgm_jax.data import get_dataset, pipeline  # noqa: E402
from lgm_jax.errors import InputError  # noqa: E402

NAMES = ["red", "green", "blue", "grey"]


def _split(n, seed, label_feature=None):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(4):
        for _ in range(n):
            x = np.full((32, 32, 3), 40 + 60 * c, np.uint8)
            images.append(x + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8))
            labels.append(c)
    features = datasets.Features(
        {"image": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=NAMES)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "shapes")
    datasets.DatasetDict(train=_split(6, 0), test=_split(3, 1)).save_to_disk(path)
    return path


def test_saved_dataset_opens(saved):
    ds = get_dataset(f"hf:{saved}")
    assert ds.name == f"hf:{saved}"
    assert ds.num_classes == 4 and ds.class_names == tuple(NAMES)
    assert len(ds.source("train")) == 24 and len(ds.source("test")) == 12
    ex = ds.source("train")[7]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    assert ex["label"] == 1


def test_test_falls_back_to_validation(tmp_path):
    path = str(tmp_path / "v")
    datasets.DatasetDict(train=_split(2, 0), validation=_split(1, 1)).save_to_disk(path)
    assert len(get_dataset(f"hf:{path}").source("test")) == 4


def test_errors(tmp_path):
    only_train = str(tmp_path / "t")
    _split(2, 0).save_to_disk(only_train)  # one Dataset: the train split
    ds = get_dataset(f"hf:{only_train}")
    with pytest.raises(InputError, match="splits found: train"):
        ds.source("test")
    no_label = str(tmp_path / "n")
    _split(2, 0).remove_columns("label").save_to_disk(no_label)
    with pytest.raises(InputError, match="columns found: image"):
        get_dataset(f"hf:{no_label}")
    ints = str(tmp_path / "i")
    _split(2, 0, datasets.Value("int64")).save_to_disk(ints)
    with pytest.raises(InputError, match="cast_column"):
        get_dataset(f"hf:{ints}")
    with pytest.raises(InputError, match="neither a dataset saved"):
        get_dataset(f"hf:{tmp_path}/missing", data_dir=str(tmp_path / "cache"))


def test_local_data_files_through_the_cache(saved, tmp_path):
    """A directory of parquet files goes through load_dataset(path, cache_dir=data_dir)."""
    files = tmp_path / "parquet"
    files.mkdir()
    for split, d in datasets.load_from_disk(saved).items():
        d.to_parquet(str(files / f"{split}.parquet"))
    ds = get_dataset(f"hf:{files}", data_dir=str(tmp_path / "cache"))
    assert ds.class_names == tuple(NAMES) and len(ds.source("train")) == 24
    assert os.listdir(tmp_path / "cache")  # the arrow cache was written there


def _hub_cache(saved, cache):
    """Write `cache` as load_dataset("someorg/shapes") leaves it after a download from the Hub:
    <org>___<name>/<config>/<version>/<commit>/ holding dataset_info.json and
    <name>-<split>.arrow (built here by the parquet builder, then moved into that layout)."""
    import glob
    import shutil

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = cache.parent / "files"
    files.mkdir()
    splits = datasets.load_from_disk(saved)
    for split, d in splits.items():
        d.to_parquet(str(files / f"{split}.parquet"))
    patterns = {split: [str(files / f"{split}.parquet")] for split in splits}
    builder = Parquet(
        cache_dir=str(cache),
        dataset_name="someorg___shapes",
        data_files=DataFilesDict.from_patterns(patterns),
        features=splits["train"].features,
    )
    builder.download_and_prepare()
    built = glob.glob(str(cache / "someorg___shapes" / "default-*" / "0.0.0"))[0]
    hub = cache / "someorg___shapes" / "default" / "0.0.0" / "0123456789abcdef"
    hub.parent.mkdir(parents=True)
    shutil.move(built, hub)
    for arrow in hub.glob("*.arrow"):
        arrow.rename(hub / arrow.name.replace("someorg___shapes-", "shapes-"))
    for left in glob.glob(str(cache / "someorg___shapes" / "default-*")):
        shutil.rmtree(left) if os.path.isdir(left) else os.remove(left)


def test_hub_name_from_the_local_cache(saved, tmp_path):
    """hf:<org>/<name> of a dataset already downloaded opens from the cache with the Hub offline."""
    cache = tmp_path / "cache"
    _hub_cache(saved, cache)
    ds = get_dataset("hf:someorg/shapes", data_dir=str(cache))
    assert ds.class_names == tuple(NAMES)
    assert len(ds.source("train")) == 24 and len(ds.source("test")) == 12
    expected = datasets.load_from_disk(saved)["test"][5]
    ex = ds.source("test")[5]
    np.testing.assert_array_equal(ex["image"], np.asarray(expected["image"].convert("RGB")))
    assert ex["label"] == expected["label"]
    with pytest.raises(InputError, match="neither a dataset saved"):
        get_dataset("hf:someorg/absent", data_dir=str(cache))


def test_shards_disjoint_and_batches_repeatable(saved):
    ds = get_dataset(f"hf:{saved}")
    source = ds.source("train")
    shards = [pipeline.shard_indices(len(source), p, 2) for p in range(2)]
    batches = [pipeline.TrainBatches(source, s, 4, 0, 16, p, 1) for p, s in enumerate(shards)]
    seen = [set(np.concatenate([b(k)["index"] for k in range(3)])) for b in batches]
    assert not seen[0] & seen[1]
    again = pipeline.TrainBatches(source, shards[0], 4, 0, 16, 0, 2)(2)
    np.testing.assert_array_equal(again["image"], batches[0](2)["image"])
    np.testing.assert_array_equal(again["index"], batches[0](2)["index"])


def test_smoke_distillation_and_evaluation_on_a_saved_dataset(saved, tmp_path):
    """The run and the evaluation read an hf: dataset as they read any other (no network)."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    work = tmp_path / "run"
    run = [sys.executable, "-m", "lgm_jax.main", "--config=configs/demo.py", f"--workdir={work}"]
    run += [f"--config.dataset=hf:{saved}", "--config.num_classes=4", "--config.syn_res=4"]
    run += ["--config.aug_rounds=1", "--config.steps=2", "--config.image_every=0"]
    run += ["--config.checkpoint_every=0", "--config.eval.at_end=true"]
    run += ["--config.eval.epochs=2", "--config.eval.seeds=1", "--config.compilation_cache="]
    proc = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(work / "synthetic.npz") as z:
        assert z["images"].shape == (4, 4, 4, 3) and list(z["class_names"]) == NAMES
    result = json.loads((work / "eval" / "dinov2_tiny" / "eval.json").read_text())
    assert result["dataset"] == f"hf:{saved}" and result["num_test"] == 12
    again = [sys.executable, "-m", "lgm_jax.evaluate", "--distilled", str(work)]
    again += ["--backbone", "dinov2_tiny", "--epochs", "2", "--seeds", "1", "--out", str(tmp_path)]
    proc = subprocess.run(again, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["num_test"] == 12
