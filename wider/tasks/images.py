"""Image classification with a Vision Transformer (DESIGN 5.8): an image folder, the ImageNet recipe's augmentations,
top-1 / top-5 accuracy.

Data: data.train_data and data.valid_data are image folders in ImageNet's (and torchvision ImageFolder's) layout, one
subfolder per class holding .jpg / .jpeg / .png files; the classes are the training folder's subfolder names in
sorted order, and the held-out folder may hold a subset of them. The pre-flight opens every file's header (Pillow), so
a folder without classes, an empty class, a class count other than model.num_labels or an unreadable image stop the
run before anything is written.

Training samples (the official WideNet recipe, XueFuzhao/WideNet_Code widenet/train.py with submit_tpu.sh's
--inception_style, whose ImageNet run these defaults follow): RandAugment (2 operations, magnitude 15), an
Inception-style random-resized crop of 5%-100% of the area to image_size, a random horizontal flip, pixels scaled to
[-1, 1] ((x - 127.5) / 127.5), and mixup with Beta(0.5, 0.5) against an independently drawn partner image (the
official code zips two independently shuffled streams; mixing inside a batch would tie a sample to its batch mates
and so to the rank layout); label smoothing 0.1 (data.label_smoothing). Held-out samples: resized to image_size, the
same scaling. The augmentations are kornia's (kornia.augmentation: RandomResizedCrop, RandomHorizontalFlip,
auto.RandAugment), pure PyTorch: torchvision, the field's usual library, ships compiled operators that must match the
torch build exactly, and no torchvision wheel for this CPU torch 2.13.0 build installs beside it (its import fails
with "operator torchvision::nms does not exist"). Every random draw of sample i comes from a seed of (train.seed, i),
so a sample is the same on any rank layout and after a resume; the run's own random streams are left untouched.

Images are decoded in the training process, sample by sample (enough for the embedded digits; an ImageNet run on GPUs
wants decoding in worker processes, which this loop does not have yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from wider.data import DataError, Splits
from wider.tasks.base import (EpochCycle, EvalResult, Task, majority_share, sample_seed, smoothed,
                              soft_cross_entropy)

EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class ImageFolder:
    root: str
    classes: list  # class names (subfolders), sorted: class index = position
    files: list  # image paths
    labels: np.ndarray  # class index per file


def scan(root: str, classes: Optional[list] = None) -> ImageFolder:
    """The images of a class-per-subfolder folder. classes: the training folder's classes (a held-out folder's
    subfolders must be among them; index = position there). Raises DataError naming the folder and the fix."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist; give --train-data / --valid-data folders with one "
                        "subfolder of JPEG / PNG images per class (the embedded digits: python "
                        "data_prep/prepare_embedded.py --task image_classification)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not found:
        raise DataError(f"image folder {root!r} holds no class subfolder; lay it out as {root}/<class>/<image>.jpg "
                        "(ImageNet's train/ and val/ layout)")
    index = {c: i for i, c in enumerate(classes if classes is not None else found)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"image folder {root!r} has classes {unknown[:5]} that the training folder lacks; the held-out "
                        "folder's classes must be training classes")
    files, labels = [], []
    for c in found:
        names = sorted(n for n in os.listdir(os.path.join(root, c)) if n.lower().endswith(EXTENSIONS))
        if not names:
            raise DataError(f"class folder {os.path.join(root, c)!r} holds no .jpg / .jpeg / .png image; add images "
                            "or remove the folder")
        files += [os.path.join(root, c, n) for n in names]
        labels += [index[c]] * len(names)
    return ImageFolder(root=root, classes=list(index), files=files, labels=np.asarray(labels, dtype=np.int64))


def verify(folder: ImageFolder) -> None:
    """Every file opens as an image (Pillow reads and checks the header without decoding the pixels)."""
    from PIL import Image

    for path in folder.files:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise DataError(f"image {path!r} cannot be read ({type(e).__name__}: {e}); replace or remove it") from None


def load(path: str, channels: int) -> torch.Tensor:
    """The image as [channels, H, W] floats in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001
        raise DataError(f"image {path!r} cannot be decoded ({type(e).__name__}: {e}); replace or remove it") from None
    return torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1).contiguous()


class Augment:
    """The training transform of one image [1, C, H, W] in [0, 1] -> [1, C, S, S] in [0, 1] (see the module docstring),
    kornia's modules with their draws taken from a seed (torch's global stream is forked and restored)."""

    def __init__(self, cfg):
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment

        m, d = cfg.model, cfg.data
        size = (m.image_size, m.image_size)
        self.randaugment = (RandAugment(n=d.randaugment_ops, m=int(d.randaugment_magnitude))
                            if d.randaugment_ops else None)
        self.crop = (K.RandomResizedCrop(size, scale=(d.image_crop_scale, 1.0), p=1.0)
                     if d.image_crop_scale < 1 else None)
        self.flip = K.RandomHorizontalFlip(p=0.5) if d.image_flip else None
        self.size = size

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.randaugment is not None:
                x = self.randaugment(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)[:, : x.shape[1]]
            x = self.crop(x) if self.crop is not None else resize(x, self.size)
            if self.flip is not None:
                x = self.flip(x)
        return x.clamp(0.0, 1.0)


def resize(x: torch.Tensor, size: tuple) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                      align_corners=False, antialias=True)


class ImageSamples:
    """Sample i: image [C, S, S] scaled to [-1, 1], label (class index), target [K] (a distribution: mixup's mixture of
    two one-hot labels in training, the one-hot label when held out)."""

    def __init__(self, folder: ImageFolder, length: int, cfg, split: int, cycle: Optional[EpochCycle] = None,
                 augment: Optional[Augment] = None):
        self.folder, self.length, self.cycle, self.augment, self.split = folder, length, cycle, augment, split
        m, d = cfg.model, cfg.data
        self.channels, self.size, self.classes = m.num_channels, (m.image_size, m.image_size), m.num_labels
        self.seed, self.mixup = cfg.train.seed, d.mixup_alpha if augment is not None else 0.0

    def __len__(self) -> int:
        return self.length

    def _image(self, j: int, seed: int) -> torch.Tensor:
        x = load(self.folder.files[j], self.channels)[None]
        x = self.augment(x, seed) if self.augment is not None else resize(x, self.size)
        return x[0] * 2.0 - 1.0

    def __getitem__(self, i: int) -> dict:
        seed = sample_seed(self.seed, self.split, i)
        j = self.cycle(i) if self.cycle is not None else i
        label = int(self.folder.labels[j])
        image, target = self._image(j, seed), F.one_hot(torch.tensor(label), self.classes).float()
        if self.mixup > 0:
            rng = np.random.default_rng(seed)
            partner, lam = int(rng.integers(len(self.folder.files))), float(rng.beta(self.mixup, self.mixup))
            other = self._image(partner, seed ^ 0x5DEECE66D)
            image = lam * image + (1.0 - lam) * other
            target = lam * target + (1.0 - lam) * F.one_hot(torch.tensor(int(self.folder.labels[partner])),
                                                             self.classes).float()
        return {"image": image, "label": torch.tensor(label), "target": target}


class ImageClassification(Task):
    name = "image_classification"
    uses_tokenizer = False

    def _folders(self) -> tuple[ImageFolder, ImageFolder]:
        d, m = self.cfg.data, self.cfg.model
        train = scan(d.locate(d.train_data))
        if len(train.classes) != m.num_labels:
            raise DataError(f"image folder {train.root!r} has {len(train.classes)} classes but model.num_labels is "
                            f"{m.num_labels}; pass --num-labels {len(train.classes)}")
        return train, scan(d.locate(d.valid_data), train.classes)

    def check_inputs(self, tokenizer) -> None:
        for folder in self._folders():
            verify(folder)

    def build_data(self, tokenizer, train_samples: int, valid_samples: int, cache_dir: str) -> Splits:
        cfg = self.cfg
        train, valid = self._folders()
        self.valid_labels = valid.labels
        return Splits(train=ImageSamples(train, train_samples, cfg, 0, EpochCycle(len(train.files), cfg.train.seed),
                                         Augment(cfg)),
                      valid=ImageSamples(valid, len(valid.files), cfg, 1), valid_epoch_samples=len(valid.files))

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        logits_BK = engine(batch["image"]).float()
        loss = soft_cross_entropy(logits_BK, smoothed(batch["target"], self.cfg.data.label_smoothing))
        # With mixup this counts the larger-weight image's class as the answer (a training-time indication only).
        return loss, {"accuracy": (logits_BK.argmax(-1) == batch["target"].argmax(-1)).float().mean().detach()}

    def eval_sums(self, engine, batch: dict) -> torch.Tensor:
        """[loss sum, images, top-1 correct, top-5 correct], float64."""
        logits_BK = engine(batch["image"]).float()
        label_B = batch["label"]
        top = logits_BK.topk(min(5, logits_BK.shape[-1]), dim=-1).indices
        return torch.stack([F.cross_entropy(logits_BK, label_B, reduction="sum").double(),
                            torch.tensor(float(len(label_B)), dtype=torch.float64, device=logits_BK.device),
                            (top[:, 0] == label_B).sum().double(), (top == label_B[:, None]).any(-1).sum().double()])

    @property
    def eval_width(self) -> int:
        return 4

    def eval_result(self, sums: torch.Tensor) -> EvalResult:
        s = sums.tolist()
        n = max(s[1], 1.0)
        metrics = {"accuracy": s[2] / n}
        if self.cfg.model.num_labels > 5:
            metrics["top5_accuracy"] = s[3] / n
        return EvalResult(loss=s[0] / n, count=int(s[1]), metrics=metrics)

    def summary(self, result: EvalResult) -> tuple[dict, list]:
        majority = majority_share(self.valid_labels, self.cfg.model.num_labels)
        return ({**result.metrics, "majority_class_accuracy": majority},
                [f"held-out top-1 accuracy {result.metrics['accuracy']:.4f} on {result.count:,} images (the majority "
                 f"class scores {majority:.4f})"])
