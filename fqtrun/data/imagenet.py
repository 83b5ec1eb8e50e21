"""ImageNet (or any ImageFolder-style set) from root/train and root/val, one sub-folder per class."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from fqtrun.data.base import DataBundle, DatasetError, one_line

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOW = ("get ILSVRC2012 from https://image-net.org/download.php and arrange train/ and val/ with one "
       "sub-folder of images per class (e.g. train/n01440764/*.JPEG)")


def _folder(root: str, split: str, transform) -> datasets.ImageFolder:
    where = Path(root).expanduser() / split
    if not where.is_dir() or not any(p.is_dir() for p in where.iterdir()):
        raise DatasetError(f"dataset.root={root}: expected class sub-folders in {where}; {HOW}")
    try:
        return datasets.ImageFolder(str(where), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"dataset.root={root}: no readable images in the class folders of {where} "
                           f"({one_line(exc)}); {HOW}") from exc


def build(root: str, crop: int = 224, resize: int = 256) -> DataBundle:
    """Train: RandomResizedCrop(crop) + flip; val: Resize(resize) + CenterCrop(crop); ImageNet mean/std."""
    if crop < 1 or resize < crop:
        raise ValueError(f"dataset.crop={crop}, dataset.resize={resize}: need 1 <= crop <= resize "
                         f"(val images are resized to `resize` then centre-cropped to `crop`)")
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train = _folder(root, "train", transforms.Compose(
        [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(), *norm]))
    val = _folder(root, "val", transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(crop), *norm]))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise DatasetError(f"dataset.root={root}: train/ and val/ must hold the same class folders "
                           f"(differ in e.g. {', '.join(only)}); {HOW}")
    return DataBundle(train=train, test=val, num_classes=len(train.classes), input_shape=(3, crop, crop),
                      name="imagenet")
