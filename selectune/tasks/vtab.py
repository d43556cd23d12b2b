"""VTAB-1k: the 19 vision tasks in three groups, read from the folder layout the PETL community
distributes (`<root>/vtab-1k/<task>/train800.txt, val200.txt, train800val200.txt, test.txt`, one
"relative/path label" a line, images beside them).

Protocol: `select` trains on train800 and evaluates on val200 (for model selection); `final` trains on
train800val200 and evaluates on test (the number papers report). Results are reported per task and as
BOTH averages papers use: the mean of the 19 tasks and the mean of the three group means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from selectune.errors import SelectuneError
from selectune.tasks.text import excerpt, read_utf8

GROUPS = {
    "natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"],
}
CLASSES = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
           "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
           "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
           "smallnorb_azi": 18, "smallnorb_ele": 9}
# protocol -> (training list, evaluation list, evaluation split name)
PROTOCOLS = {"select": ("train800", "val200", "val"), "final": ("train800val200", "test", "test")}


class ImageExample(NamedTuple):
    path: Path
    label: int


@dataclass(frozen=True)
class VtabSpec:
    name: str
    group: str
    num_labels: int
    metrics: tuple[str, ...] = ("accuracy",)
    primary: str = "accuracy"
    is_regression: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(self.num_labels))


def vtab_spec(name: str, num_classes: int | None = None) -> VtabSpec:
    """A VTAB-1k task; any other folder in the layout works too when its class count is given."""
    group = group_of(name)
    classes = num_classes or CLASSES.get(name)
    if classes is None:
        raise SelectuneError(f"unknown VTAB-1k task '{name}' (known: {', '.join(CLASSES)}); for another task in "
                             f"the same layout give task.num_classes")
    return VtabSpec(name, group, classes)


def read_list(path: Path, num_classes: int, limit: int | None = None) -> list[ImageExample]:
    """One list file; a bad line or a missing image fails with the file and line number."""
    if not path.is_file():
        raise SelectuneError(f"missing VTAB-1k list file {path} (expected train800.txt, val200.txt, "
                             f"train800val200.txt and test.txt beside the images)")
    examples = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise SelectuneError(f"{path}:{lineno}: bad line {excerpt(line.strip())}: expected 'relative/path label'")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise SelectuneError(f"{path}:{lineno}: label {label} outside 0..{num_classes - 1}")
        image = path.parent / parts[0]
        if not image.is_file():
            raise SelectuneError(f"{path}:{lineno}: missing image {excerpt(str(image))}")
        examples.append(ImageExample(image, label))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def task_folder(name: str, data_root: str | None) -> Path:
    if not data_root:
        raise SelectuneError(f"no data folder for VTAB-1k {name}: set SELECTUNE_DATA=<root> (holding "
                             f"vtab-1k/{name}/train800.txt) or task.data_root=<root>")
    root = Path(data_root).expanduser()
    candidates = [root / "vtab-1k" / name, root / name]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise SelectuneError(f"VTAB-1k {name} data not found: looked in {' and '.join(map(str, candidates))}; set "
                         f"SELECTUNE_DATA or task.data_root to the folder that holds vtab-1k/{name}/")


def read_local(spec: VtabSpec, data_root: str | None, protocol: str,
               limits: dict[str, int | None]) -> dict[str, list[ImageExample]]:
    if protocol not in PROTOCOLS:
        raise SelectuneError(f"task.protocol='{protocol}': use select (train800 -> val200) or final "
                             f"(train800val200 -> test)")
    folder = task_folder(spec.name, data_root)
    train, dev, dev_name = PROTOCOLS[protocol]
    return {"train": read_list(folder / f"{train}.txt", spec.num_labels, limits.get("train")),
            dev_name: read_list(folder / f"{dev}.txt", spec.num_labels, limits.get("dev"))}


def group_of(task: str) -> str:
    return next((g for g, tasks in GROUPS.items() if task in tasks), "other")


def averages(accuracy: dict[str, float]) -> dict[str, float | int]:
    """Both averages papers use, over the tasks present: the mean of the task accuracies, and the mean
    of the group means (Natural / Specialized / Structured; tasks outside the 19 form the group "other").
    With all 19 tasks these are the two VTAB-1k numbers (full FT: 65.6 and 69.0 in the literature)."""
    groups: dict[str, list[float]] = {}
    for task, value in accuracy.items():
        groups.setdefault(group_of(task), []).append(value)
    means = {g: sum(v) / len(v) for g, v in groups.items()}
    values = list(accuracy.values())
    return {"tasks": len(values), "mean_of_tasks": sum(values) / len(values) if values else float("nan"),
            "mean_of_group_means": sum(means.values()) / len(means) if means else float("nan"),
            **{f"{g}_mean": m for g, m in sorted(means.items())}}
