"""`fgvr data stats`: a quick picture of a data set: class balance, image sizes, box sizes.

Image sizes come from the files' headers (nothing is decoded), so this takes seconds even for
tens of thousands of images.
"""

from __future__ import annotations

import numpy as np

from fgvr.data.check import scan_images
from fgvr.data.readers import Splits

PERCENTILES = (0, 5, 50, 95, 100)
COLUMNS = ("min", "p5", "median", "p95", "max")


def _spread(values: np.ndarray) -> dict[str, float]:
    """min, p5, median, p95, max (empty for no values)."""
    if len(values) == 0:
        return {}
    return dict(zip(COLUMNS, np.percentile(values, PERCENTILES).round(3).tolist()))


def stats(name: str, splits: Splits, workers: int | None = None, progress: bool = False) -> dict:
    out: dict = {"name": name, "classes": len(splits.classes), "splits": {}}
    if splits.hierarchy:
        levels = max(len(a) for a in splits.hierarchy.values())
        out["hierarchy"] = [len({a[d] for a in splits.hierarchy.values() if len(a) > d}) for d in range(levels)]
    for split in ("train", "test"):
        records = getattr(splits, split)
        per_class = np.bincount(records.labels, minlength=len(splits.classes))
        infos = scan_images(records.paths.tolist(), decode=False, workers=workers, progress=progress)
        ok = np.array([not i.problem for i in infos], bool)
        size = np.array([(i.width, i.height) for i in infos], float).reshape(-1, 2)
        boxes = records.boxes
        has_box = np.isfinite(boxes).all(1) & ok
        box_wh = boxes[has_box, 2:] - boxes[has_box, :2]
        area = box_wh.prod(1) / size[has_box].prod(1)
        out["splits"][split] = {
            "images": len(records),
            "unreadable": int((~ok).sum()),
            "per_class": _spread(per_class) | {"imbalance": round(float(per_class.max() / max(per_class.min(), 1)), 2)},
            "width": _spread(size[ok, 0]), "height": _spread(size[ok, 1]),
            "aspect": _spread(size[ok, 0] / size[ok, 1]),
            "with_box": int(has_box.sum()),
            "box_area_fraction": _spread(area),
            "box_width_fraction": _spread(box_wh[:, 0] / size[has_box, 0]),
            "box_height_fraction": _spread(box_wh[:, 1] / size[has_box, 1]),
        }
    return out


def format_stats(s: dict) -> str:
    head = f"{s['name']}: {s['classes']} classes"
    if "hierarchy" in s:
        nodes = ", ".join(map(str, s["hierarchy"]))
        head += f"; above them {len(s['hierarchy'])} levels of the hierarchy with {nodes} nodes"
    lines = [head]
    rows = [("images per class", "per_class", "{:.0f}"), ("width (px)", "width", "{:.0f}"),
            ("height (px)", "height", "{:.0f}"), ("aspect (w/h)", "aspect", "{:.2f}"),
            ("box area / image", "box_area_fraction", "{:.2f}"), ("box width / image", "box_width_fraction", "{:.2f}"),
            ("box height / image", "box_height_fraction", "{:.2f}")]
    for split, d in s["splits"].items():
        extra = f", {d['unreadable']} unreadable" if d["unreadable"] else ""
        lines.append(f"{split}: {d['images']} images, {d['with_box']} with a box{extra}; "
                     f"class imbalance (max/min) {d['per_class']['imbalance']}")
        lines.append(f"  {'':20s} " + " ".join(f"{k:>8s}" for k in COLUMNS))
        for label, key, fmt in rows:
            if d[key]:
                lines.append(f"  {label:20s} " + " ".join(f"{fmt.format(d[key][k]):>8s}" for k in COLUMNS))
    return "\n".join(lines)
