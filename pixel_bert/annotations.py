"""Annotation files as distributed (docs/paper.md#data-formats) -> (image, caption) records.

    read_json, json_field, json_list   JSON with errors that name the file and the entry (every task)
    read_coco_captions                 COCO captions_*.json
    read_karpathy, karpathy_coco_ids   Karpathy's dataset_coco.json / dataset_flickr30k.json
    read_visual_genome                 Visual Genome region descriptions
    build_pretrain_records             the paper's pre-training mix (Sec. 4.1): COCO Karpathy train +
                                       restval, Visual Genome minus the COCO Karpathy val/test images
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from .errors import UserError

class CaptionRecord(NamedTuple):
    """One (image, caption) pair: an immutable tuple, which keeps millions of them (VG has 5M) small.

    ``image_key`` identifies the image across datasets ("coco:123", "vg:456", "flickr30k:1000092795")
    so that ITM negatives can avoid captions of the same image. About half of VG's images are COCO
    images: `read_visual_genome` gives those their "coco:" key, so a VG phrase is never used as a
    "negative" caption of the very same picture.
    ``size`` is the (width, height) when the annotations give it, else None; it lets
    `aspect_ratio_group_ids` skip opening the file.
    """
    image_path: str
    caption: str
    image_key: str
    size: Optional[Tuple[int, int]] = None


class AnnotationError(UserError):
    """An annotation file is not in the expected format; the message names the file and the entry."""


def read_json(path: str, expected: str) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (expected {expected})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); expected {expected}") from err


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def json_field(obj: Any, key: str, types, where: str, path: str) -> Any:
    """``obj[key]``, checked: a clear AnnotationError if obj is not a dict, lacks key, or the value
    has the wrong type (bool is refused where an int is expected, although it subclasses int)."""
    if not isinstance(obj, dict):
        raise AnnotationError(f"{path}: {where} is a {type(obj).__name__}, expected a JSON object")
    if key not in obj:
        raise AnnotationError(f"{path}: {where} has no {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise AnnotationError(f"{path}: {where}[{key!r}] is {type(value).__name__} {value!r:.60}, "
                              f"expected {_type_names(types)}")
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def json_list(obj: Any, key: str, where: str, path: str) -> list:
    return json_field(obj, key, list, where, path)


def read_coco_captions(annotation_json: str, image_root: str) -> List[CaptionRecord]:
    """Records from a COCO ``captions_{train,val}2014.json``: one per annotation, in file order.

    Format (docs/paper.md#data-formats): ``images[{id, file_name, height, width}]``,
    ``annotations[{id, image_id, caption}]``. Image paths are ``image_root/file_name``; keys are
    ``"coco:{image_id}"``; sizes come from the json (no file needs opening to group by aspect).
    """
    path = os.fspath(annotation_json)
    data = read_json(path, "a COCO captions file with 'images' and 'annotations'")
    images = json_list(data, "images", "the top-level object", path)
    annotations = json_list(data, "annotations", "the top-level object", path)
    by_id: Dict[int, Tuple[str, Optional[Tuple[int, int]]]] = {}
    first_index: Dict[int, int] = {}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = json_field(image, "id", int, where, path)
        file_name = json_field(image, "file_name", str, where, path)
        if image_id in first_index:
            raise AnnotationError(f"{path}: {where} has id {image_id}, which images[{first_index[image_id]}] has "
                                  "too: captions of that id would be paired with the wrong image")
        first_index[image_id] = i
        size = None
        if "width" in image and "height" in image:
            size = (json_field(image, "width", int, where, path), json_field(image, "height", int, where, path))
        by_id[image_id] = (os.path.join(image_root, file_name), size)
    records = []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = json_field(ann, "image_id", int, where, path)
        caption = json_field(ann, "caption", str, where, path)
        if image_id not in by_id:
            raise AnnotationError(f"{path}: {where} refers to image_id {image_id}, which is not in 'images'")
        image_path, size = by_id[image_id]
        records.append(CaptionRecord(image_path, caption.strip(), f"coco:{image_id}", size))
    return records


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def karpathy_images(dataset_json: str, splits: Sequence[str]) -> Tuple[str, str, List[Tuple[int, dict]]]:
    """(path, dataset name, [(position, image entry)]) of the Karpathy images in ``splits``."""
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {unknown}; the splits are {list(KARPATHY_SPLITS)}")
    path = os.fspath(dataset_json)
    data = read_json(path, "a Karpathy dataset_*.json with 'images'")
    images = json_list(data, "images", "the top-level object", path)
    dataset = data.get("dataset", "karpathy")
    if not isinstance(dataset, str):
        raise AnnotationError(f"{path}: 'dataset' is {type(dataset).__name__}, expected a string")
    selected = []
    for i, image in enumerate(images):
        split = json_field(image, "split", str, f"images[{i}]", path)
        if split not in KARPATHY_SPLITS:
            raise AnnotationError(f"{path}: images[{i}] has split {split!r}, "
                                  f"expected one of {list(KARPATHY_SPLITS)}")
        if split in splits:
            selected.append((i, image))
    return path, dataset, selected


def read_karpathy(dataset_json: str, image_root: str,
                  splits: Sequence[str] = ("train", "restval")) -> List[CaptionRecord]:
    """Records from Karpathy's ``dataset_coco.json`` or ``dataset_flickr30k.json``.

    Format (docs/paper.md#data-formats): ``images[{filepath?, filename, imgid, cocoid?, split,
    sentences[{raw, ...}]}]``. The default splits are the paper's pre-training split for COCO
    (train + restval, Sec. 4.1). Image paths are ``image_root/filepath/filename`` for COCO
    (filepath is "train2014" or "val2014") and ``image_root/filename`` for Flickr30K (no filepath).
    Captions are the ``raw`` sentences. Keys are ``"coco:{cocoid}"`` (the same keys as
    `read_coco_captions`) or ``"{dataset}:{filename without extension}"`` for Flickr30K.
    """
    path, dataset, selected = karpathy_images(dataset_json, splits)
    records = []
    first_index: Dict[str, int] = {}
    for i, image in selected:
        where = f"images[{i}]"
        filename = json_field(image, "filename", str, where, path)
        filepath = json_field(image, "filepath", str, where, path) if "filepath" in image else ""
        image_path = os.path.join(image_root, filepath, filename)
        if image_path in first_index:
            raise AnnotationError(f"{path}: {where} is image {os.path.join(filepath, filename)}, which "
                                  f"images[{first_index[image_path]}] is too: each image must be listed once")
        first_index[image_path] = i
        if "cocoid" in image:
            key = f"coco:{json_field(image, 'cocoid', int, where, path)}"
        else:
            key = f"{dataset}:{os.path.splitext(filename)[0]}"
        for j, sentence in enumerate(json_list(image, "sentences", where, path)):
            raw = json_field(sentence, "raw", str, f"{where}['sentences'][{j}]", path)
            records.append(CaptionRecord(image_path, raw.strip(), key))
    return records


def karpathy_coco_ids(dataset_json: str, splits: Sequence[str]) -> Set[int]:
    """The COCO image ids (``cocoid``) of the Karpathy ``splits`` in ``dataset_coco.json``.

    Used to drop the COCO Karpathy val/test images from Visual Genome (Sec. 4.1 of the paper).
    """
    path, _, selected = karpathy_images(dataset_json, splits)
    ids = set()
    for i, image in selected:
        if isinstance(image, dict) and "cocoid" not in image:
            raise AnnotationError(f"{path}: images[{i}] has no 'cocoid'; pass Karpathy's dataset_coco.json "
                                  "(dataset_flickr30k.json has no COCO ids)")
        ids.add(json_field(image, "cocoid", int, f"images[{i}]", path))
    return ids


VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def _vg_image_path(image_root: str, image_id: int) -> str:
    """The VG image file: ``VG_100K/`` or ``VG_100K_2/`` (the two zip parts), whichever holds it.
    If neither does, the first candidate is returned so that loading it reports a missing file."""
    candidates = [os.path.join(image_root, d, f"{image_id}.jpg") for d in VG_IMAGE_DIRS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return candidates[0]


def read_visual_genome(region_json: str, image_data_json: str, image_root: str,
                       exclude_coco_ids: Iterable[int] = ()) -> List[CaptionRecord]:
    """Records from Visual Genome ``region_descriptions.json``: one per region, the phrase as caption.

    Format (docs/paper.md#data-formats): a list of ``{id, regions[{region_id, image_id, phrase, x, y,
    width, height}]}``; ``image_data.json`` lists ``{image_id, coco_id, width, height, ...}``.
    Images whose ``coco_id`` is in ``exclude_coco_ids`` are dropped: pass the COCO Karpathy val and
    test ids (`karpathy_coco_ids`) so no retrieval test image is seen in pre-training
    (Sec. 4.1). Keys are ``"vg:{image_id}"``, or ``"coco:{coco_id}"`` for VG images taken from
    COCO. Region boxes are not used (Pixel-BERT has no boxes).
    """
    exclude = set(exclude_coco_ids)
    info_path = os.fspath(image_data_json)
    image_data = read_json(info_path, "Visual Genome image_data.json (a list of images)")
    if not isinstance(image_data, list):
        raise AnnotationError(f"{info_path}: top level is a {type(image_data).__name__}, "
                              "expected a list of images")
    info: Dict[int, Tuple[Optional[int], Optional[Tuple[int, int]]]] = {}
    for i, entry in enumerate(image_data):
        where = f"[{i}]"
        id_key = "image_id" if isinstance(entry, dict) and "image_id" in entry else "id"  # v1.2 / v1.0
        image_id = json_field(entry, id_key, int, where, info_path)
        coco_id = json_field(entry, "coco_id", (int, type(None)), where, info_path) if "coco_id" in entry else None
        size = None
        if "width" in entry and "height" in entry:
            size = (json_field(entry, "width", int, where, info_path),
                    json_field(entry, "height", int, where, info_path))
        if image_id in info:
            raise AnnotationError(f"{info_path}: {where} is image {image_id}, listed earlier in the file too")
        info[image_id] = (coco_id, size)

    path = os.fspath(region_json)
    regions_by_image = read_json(path, "Visual Genome region_descriptions.json (a list of images)")
    if not isinstance(regions_by_image, list):
        raise AnnotationError(f"{path}: top level is a {type(regions_by_image).__name__}, expected a list")
    records = []
    seen: Set[int] = set()
    for i, entry in enumerate(regions_by_image):
        where = f"[{i}]"
        id_key = "id" if isinstance(entry, dict) and "id" in entry else "image_id"
        image_id = json_field(entry, id_key, int, where, path)
        regions = json_list(entry, "regions", where, path)
        if image_id in seen:
            raise AnnotationError(f"{path}: {where} is image {image_id}, listed earlier in the file too: its "
                                  "regions would be counted twice")
        seen.add(image_id)
        if image_id not in info:
            raise AnnotationError(f"{path}: {where} is image {image_id}, which {info_path} does not list; "
                                  "are the two files from the same Visual Genome version?")
        coco_id, size = info[image_id]
        if coco_id is not None and coco_id in exclude:
            continue
        image_path = _vg_image_path(image_root, image_id)  # one lookup per image, shared by its regions
        # A VG image that is a COCO image gets the COCO key: same picture, same key (ITM negatives).
        key = f"coco:{coco_id}" if coco_id is not None else f"vg:{image_id}"
        for j, region in enumerate(regions):
            phrase = json_field(region, "phrase", str, f"{where}['regions'][{j}]", path)
            records.append(CaptionRecord(image_path, phrase.strip(), key, size))
    return records


def build_pretrain_records(karpathy_coco_json: str, coco_image_root: str,
                           vg_region_json: Optional[str] = None, vg_image_data_json: Optional[str] = None,
                           vg_image_root: Optional[str] = None) -> List[CaptionRecord]:
    """The paper's pre-training data (Sec. 4.1 of the paper): COCO Karpathy train + restval, plus
    (if given) Visual Genome regions of every image that is not a COCO Karpathy val/test image."""
    records = read_karpathy(karpathy_coco_json, coco_image_root, splits=("train", "restval"))
    vg_args = (vg_region_json, vg_image_data_json, vg_image_root)
    if any(a is not None for a in vg_args):
        if not all(a is not None for a in vg_args):
            raise ValueError("build_pretrain_records: give all of vg_region_json, vg_image_data_json and "
                             "vg_image_root, or none of them")
        held_out = karpathy_coco_ids(karpathy_coco_json, ("val", "test"))
        records += read_visual_genome(vg_region_json, vg_image_data_json, vg_image_root,
                                      exclude_coco_ids=held_out)
    return records
