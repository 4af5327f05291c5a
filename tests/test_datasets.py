"""Tests for pixel_bert.datasets: `verify` on small trees in the official layouts (with missing and
corrupt images planted), and `download` against a local HTTP server on 127.0.0.1.

Every file is written by the tests in a temporary directory; no network; a few seconds each.
"""
import copy
import hashlib
import io
import json
import os
import re
import shlex
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pixel_bert import datasets as ds, finetune, train
from pixel_bert.tasks import TASKS
from pixel_bert.annotations import karpathy_coco_ids, read_visual_genome

# ---- trees in the official layouts ----------------------------------------------------------------

COCO_TRAIN, COCO_VAL, COCO_TEST = (1, 2, 3, 4), (5, 6, 7, 8, 9, 10), (11, 12, 13)
KARPATHY_SPLITS = {1: "train", 2: "train", 3: "train", 4: "train", 5: "restval", 6: "restval",
                   7: "val", 8: "val", 9: "test", 10: "test"}


def write_json(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.write("".join(json.dumps(o) + "\n" for o in obj))
        else:
            json.dump(obj, f)


def image_bytes(fmt="JPEG", size=(12, 9)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path, fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(image_bytes(fmt))


def coco_path(root, folder, image_id):
    return os.path.join(root, "coco", folder, f"COCO_{folder}_{image_id:012d}.jpg")


def make_tree(root):
    """Every dataset, clean, in the layout `download` makes and the README documents."""
    root = str(root)
    for folder, ids in (("train2014", COCO_TRAIN), ("val2014", COCO_VAL), ("test2015", COCO_TEST)):
        for i in ids:
            write_image(coco_path(root, folder, i))
        if folder != "test2015":
            write_json(os.path.join(root, "coco", "annotations", f"captions_{folder}.json"), {
                "images": [{"id": i, "file_name": f"COCO_{folder}_{i:012d}.jpg", "height": 9, "width": 12}
                           for i in ids],
                "annotations": [{"id": 10 * i, "image_id": i, "caption": f"a photo {i}"} for i in ids]})
    write_json(os.path.join(root, "karpathy", "dataset_coco.json"), {"dataset": "coco", "images": [
        {"filepath": "train2014" if i in COCO_TRAIN else "val2014",
         "filename": f"COCO_{'train2014' if i in COCO_TRAIN else 'val2014'}_{i:012d}.jpg", "imgid": i, "cocoid": i,
         "split": split,
         "sentences": [{"raw": f"a photo {i}", "sentid": 2 * i}, {"raw": "a thing", "sentid": 2 * i + 1}]}
        for i, split in KARPATHY_SPLITS.items()]})
    write_json(os.path.join(root, "karpathy", "dataset_flickr30k.json"), {"dataset": "flickr30k", "images": [
        {"filename": f"{1000 + i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": "a dog", "sentid": i}]}
        for i, split in enumerate(("train", "train", "val", "test"))]})
    for i in range(4):
        write_image(os.path.join(root, "flickr30k", "flickr30k-images", f"{1000 + i}.jpg"))
    make_visual_genome(root)
    make_vqa(root)
    make_nlvr2(root)
    return root


def make_visual_genome(root):
    # 101 is COCO image 1 (Karpathy train), 102 is COCO image 7 (Karpathy val: left out), 103/104 are not COCO.
    images = {101: ("VG_100K", 1), 102: ("VG_100K_2", 7), 103: ("VG_100K", None), 104: ("VG_100K_2", None)}
    for image_id, (folder, _) in images.items():
        write_image(os.path.join(root, "vg", folder, f"{image_id}.jpg"))
    write_json(os.path.join(root, "vg", "image_data.json"),
               [{"image_id": i, "coco_id": c, "width": 12, "height": 9} for i, (_, c) in images.items()])
    write_json(os.path.join(root, "vg", "region_descriptions.json"), [
        {"id": i, "regions": [{"region_id": 10 * i + k, "image_id": i, "phrase": f"region {k}", "x": 0, "y": 0,
                               "width": 4, "height": 4} for k in range(2)]} for i in images])


def make_vqa(root):
    splits = {"train2014": COCO_TRAIN, "val2014": COCO_VAL, "test-dev2015": COCO_TEST[:2], "test2015": COCO_TEST}
    for split, ids in splits.items():
        questions = [{"image_id": i, "question": f"what is {k} ?", "question_id": 100 * i + k}
                     for i in ids for k in range(2)]
        write_json(os.path.join(root, "vqa", f"v2_OpenEnded_mscoco_{split}_questions.json"), {"questions": questions})
        if not split.startswith("test"):
            write_json(os.path.join(root, "vqa", f"v2_mscoco_{split}_annotations.json"), {"annotations": [
                {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                 "answer_type": "other", "multiple_choice_answer": "red",
                 "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]}
                for q in questions]})


def make_nlvr2(root):
    examples = {"train": ["train-1-0-0", "train-1-0-1", "train-2-0-0"], "dev": ["dev-1-0-0", "dev-1-1-0"],
                "test1": ["test1-1-0-0"]}
    for split, identifiers in examples.items():
        lines = [{"identifier": ident, "sentence": "there are two dogs", "label": "True",
                  **({"directory": "7"} if split == "train" else {})} for ident in identifiers]
        write_json(os.path.join(root, "nlvr2", "data", f"{split}.json"), lines, lines=True)
        folder = os.path.join(root, "nlvr2", "images", split, *(["7"] if split == "train" else []))
        for stem in {ident.rsplit("-", 1)[0] for ident in identifiers}:
            for side in (0, 1):
                write_image(os.path.join(folder, f"{stem}-img{side}.png"), fmt="PNG")


def plant_bad_images(root):
    """Missing, zero-byte, truncated and random-bytes images; returns them by kind."""
    missing = [coco_path(root, "train2014", 2), os.path.join(root, "vg", "VG_100K", "103.jpg"),
               os.path.join(root, "flickr30k", "flickr30k-images", "1003.jpg")]
    for path in missing:
        os.remove(path)
    zero_byte = coco_path(root, "val2014", 6)
    truncated = os.path.join(root, "vg", "VG_100K_2", "104.jpg")
    random_bytes = os.path.join(root, "nlvr2", "images", "dev", "dev-1-1-img1.png")
    open(zero_byte, "wb").close()
    whole = image_bytes(size=(64, 48))
    with open(truncated, "wb") as f:
        f.write(whole[: len(whole) // 2])
    with open(random_bytes, "wb") as f:
        f.write(os.urandom(300))
    return {"missing": missing, "unreadable": [zero_byte, truncated, random_bytes]}


def all_flags(root):
    return ["--coco-karpathy", f"{root}/karpathy/dataset_coco.json", "--coco-images", f"{root}/coco",
            "--vg-regions", f"{root}/vg/region_descriptions.json", "--vg-image-data", f"{root}/vg/image_data.json",
            "--vg-images", f"{root}/vg", "--vqa-root", f"{root}/vqa", "--vqa-images", f"{root}/coco",
            "--nlvr2-root", f"{root}/nlvr2/data", "--nlvr2-images", f"{root}/nlvr2/images",
            "--karpathy-json", f"{root}/karpathy/dataset_flickr30k.json",
            "--retrieval-images", f"{root}/flickr30k/flickr30k-images"]


def run_verify(capsys, flags, *extra):
    rc = ds.main(["verify", *flags, "--workers", "2", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def splits_of(report):
    return {(d["dataset"], s["split"]): s for d in report["datasets"] for s in d["splits"]}


# ---- verify ---------------------------------------------------------------------------------------

def test_verify_counts_found_missing_unreadable_exactly(tmp_path, capsys):
    root = make_tree(tmp_path)
    bad = plant_bad_images(root)
    report_path = str(tmp_path / "report.json")
    rc, out, err = run_verify(capsys, all_flags(root), "--max-bad-fraction", "0.5", "--report", report_path)
    with open(report_path) as f:
        report = json.load(f)
    rows = splits_of(report)
    # (records, images, missing, unreadable, status) per split
    expected = {
        ("coco-karpathy", "train+restval"): (12, 6, 1, 1, "warning"),   # 2/6 bad <= 50%
        ("vg", "all"): (6, 3, 1, 1, "UNUSABLE"),                        # 102 left out (Karpathy val); 2/3 bad
        ("vqa", "train2014"): (8, 4, 1, 0, "warning"),
        ("vqa", "val2014"): (12, 6, 0, 1, "warning"),
        ("vqa", "test-dev2015"): (4, 2, 0, 0, "warning"),
        ("vqa", "test2015"): (6, 3, 0, 0, "warning"),
        ("nlvr2", "train"): (3, 4, 0, 0, "warning"),
        ("nlvr2", "dev"): (2, 4, 0, 1, "warning"),
        ("nlvr2", "test1"): (1, 2, 0, 0, "warning"),
        ("retrieval", "train"): (2, 2, 0, 0, "warning"),
        ("retrieval", "val"): (1, 1, 0, 0, "warning"),
        ("retrieval", "test"): (1, 1, 1, 0, "UNUSABLE"),                # evaluation allows no bad image
    }
    got = {key: (r["records"], r["images"], len(r["missing"]), len(r["unreadable"]), r["status"])
           for key, r in rows.items()}
    assert got == expected
    assert sorted({p for r in rows.values() for p in r["missing"]}) == sorted(bad["missing"])
    assert sorted({u["path"] for r in rows.values() for u in r["unreadable"]}) == sorted(bad["unreadable"])
    assert {u["reason"] for r in rows.values() for u in r["unreadable"]} == {"corrupt_image"}
    assert rc == 1 and report["ok"] is False
    for path in bad["missing"] + bad["unreadable"]:   # the table names every bad path
        assert path in out
    assert "UNUSABLE split(s): vg all, retrieval test" in out
    assert "warning: 6 images (official 113,287)" in out     # a size mismatch is a warning in the table
    # The progress line counts the distinct images of all datasets together.
    assert re.search(r"^30/30 images \(100\.0%\)  \d+ images/s  eta 0:00:00$", err, re.M)


def test_verify_clean_tree_exits_zero_and_prints_flags_train_and_finetune_accept(tmp_path, capsys):
    root = make_tree(tmp_path)
    rc, out, _ = run_verify(capsys, all_flags(root))
    assert rc == 0, out
    assert "result: every split is usable" in out
    commands = [shlex.split(line) for line in out.split("flags for these paths:\n")[1].splitlines() if line.strip()]
    scripts = {(c[1], c[3] if c[1] == "finetune.py" else None): c[2:] for c in commands}
    assert set(scripts) == {("train.py", None), ("finetune.py", "vqa"), ("finetune.py", "nlvr2"),
                            ("finetune.py", "retrieval")}
    args = train.get_args_parser().parse_args(scripts[("train.py", None)])
    assert (args.coco_karpathy, args.coco_images, args.vg_images) == (
        f"{root}/karpathy/dataset_coco.json", f"{root}/coco", f"{root}/vg")
    vqa_args = finetune.get_args_parser().parse_args(scripts[("finetune.py", "vqa")])
    assert (vqa_args.vqa_root, vqa_args.vqa_images) == (f"{root}/vqa", f"{root}/coco")
    ret = finetune.get_args_parser().parse_args(scripts[("finetune.py", "retrieval")])
    assert ret.retrieval_images == f"{root}/flickr30k/flickr30k-images"


def test_verify_a_subset_of_flags_checks_only_that_dataset(tmp_path, capsys):
    root = make_tree(tmp_path)
    flags = ["--nlvr2-root", f"{root}/nlvr2/data", "--nlvr2-images", f"{root}/nlvr2/images"]
    rc, out, _ = run_verify(capsys, flags)
    assert rc == 0
    assert out.startswith("NLVR2: ") and "VQA" not in out and "train.py" not in out
    os.remove(f"{root}/nlvr2/data/test1.json")   # optional: absent, not an error
    rc, out, _ = run_verify(capsys, flags)
    assert rc == 0 and re.search(r"test1 +- .* absent", out)
    # Without --nlvr2-images: the images/ folder beside nlvr2/data (NLVR2's own layout), as finetune.py's
    rc, out, _ = run_verify(capsys, flags[:2])
    assert rc == 0 and f"--nlvr2-images {root}/nlvr2/images" in out
    os.rename(f"{root}/nlvr2/images", f"{root}/nlvr2/pictures")  # neither <root>/images nor one beside it
    rc, out, _ = run_verify(capsys, flags[:2])
    assert rc == 1 and f"train: note: folder(s) not found: {root}/nlvr2/data/images/train/7;" in out
    assert f"dev: note: folder(s) not found: {root}/nlvr2/data/images/dev;" in out
    with pytest.raises(SystemExit):   # an image folder alone names no dataset
        ds.main(["verify", "--nlvr2-images", f"{root}/nlvr2/images"])


def test_verify_threshold_decides_usable(tmp_path, capsys):
    root = make_tree(tmp_path)
    os.remove(coco_path(root, "train2014", 1))   # 1 of the 6 train+restval images
    flags = ["--coco-karpathy", f"{root}/karpathy/dataset_coco.json", "--coco-images", f"{root}/coco"]
    rc, out, _ = run_verify(capsys, flags)                                   # default 1%
    assert rc == 1 and "1 of 6 images missing or unreadable (16.67% > 1% allowed)" in out
    assert run_verify(capsys, flags, "--max-bad-fraction", "0.2")[0] == 0


def test_verify_missing_and_malformed_files_name_the_file_and_the_fix(tmp_path, capsys):
    root = make_tree(tmp_path)
    os.remove(f"{root}/vqa/v2_mscoco_val2014_annotations.json")
    with open(f"{root}/vg/image_data.json", "w") as f:
        f.write("[{not json")
    rc, out, _ = run_verify(capsys, ["--vqa-root", f"{root}/vqa", "--vqa-images", f"{root}/coco",
                                     "--vg-regions", f"{root}/vg/region_descriptions.json",
                                     "--vg-image-data", f"{root}/vg/image_data.json", "--vg-images", f"{root}/vg",
                                     "--karpathy-json", f"{root}/nowhere/dataset_flickr30k.json"])
    assert rc == 1
    assert f"val2014: UNUSABLE: {root}/vqa/v2_mscoco_val2014_annotations.json: file not found" in out
    assert f"all: UNUSABLE: {root}/vg/image_data.json: not valid JSON" in out
    assert f"{root}/nowhere/dataset_flickr30k.json: file not found" in out
    assert "python -m pixel_bert.datasets download vqa --root DIR" in out
    assert "python -m pixel_bert.datasets download vg --root DIR" in out


def test_verify_without_images_flag_fails_as_train_does(tmp_path, capsys):
    root = make_tree(tmp_path)
    rc, out, _ = run_verify(capsys, ["--coco-karpathy", f"{root}/karpathy/dataset_coco.json"])
    assert rc == 1 and "--coco-karpathy needs --coco-images" in out


def test_verify_no_decode_finds_missing_but_not_corrupt(tmp_path, capsys):
    root = make_tree(tmp_path)
    plant_bad_images(root)
    rc, out, _ = run_verify(capsys, ["--nlvr2-root", f"{root}/nlvr2/data", "--nlvr2-images", f"{root}/nlvr2/images",
                                     "--no-decode"])
    assert rc == 0 and "not checked" in out and "dev-1-1-img1.png" not in out


def test_verify_flags_and_defaults_match_train_finetune_evaluate():
    verify = ds.get_args_parser()._subparsers._group_actions[0].choices["verify"]
    ours = set(verify._option_string_actions)
    data_flags = {"--coco-karpathy", "--coco-images", "--coco-captions", "--coco-captions-images", "--vg-regions",
                  "--vg-image-data", "--vg-images", "--vqa-root", "--vqa-images", "--nlvr2-root", "--nlvr2-images",
                  "--karpathy-json", "--retrieval-images"}
    assert data_flags <= set(train.get_args_parser()._option_string_actions) | set(
        finetune.get_args_parser()._option_string_actions)
    assert data_flags <= ours
    assert all(action.help for action in verify._actions)
    args = verify.parse_args(["--vqa-root", "v", "--nlvr2-root", "n", "--karpathy-json", "k/dataset_coco.json"])
    resolved = ds.resolve_image_roots(args)
    assert (resolved["vqa_images"], resolved["nlvr2_images"], resolved["retrieval_images"]) == (
        TASKS["vqa"].image_root(args), TASKS["nlvr2"].image_root(args), TASKS["retrieval"].image_root(args))


def test_vg_left_out_images_match_the_reader_exclusion(tmp_path):
    root = make_tree(tmp_path)
    paths = ds.resolve_image_roots(ds.get_args_parser().parse_args(["verify", *all_flags(root)]))
    check = ds.check_visual_genome(paths)
    exclude = karpathy_coco_ids(paths["coco_karpathy"], ("val", "test"))
    records = read_visual_genome(paths["vg_regions"], paths["vg_image_data"], paths["vg_images"], exclude)
    assert check.splits[0].records == len(records) == 6
    assert check.splits[0].image_paths == list(dict.fromkeys(r.image_path for r in records))
    assert check.splits[0].official == (None, 108_077 - 1)


# ---- download -------------------------------------------------------------------------------------

class FileServer:
    """http.server on 127.0.0.1 serving {name: bytes}, with HTTP Range; can cut a response short once."""

    def __init__(self, files):
        self.files, self.cut_once, self.requests = dict(files), set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                body = server.files.get(name)
                server.requests.append((name, self.headers.get("Range")))
                if body is None:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match else 0
                if match and start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if name in server.cut_once:   # the connection drops half-way
                    server.cut_once.discard(name)
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def zip_folder(files):
    """A zip archive (bytes) of {name in archive: file path}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, path in files.items():
            z.write(path, name)
    return buffer.getvalue()


def official_archives(tree):
    """The archives of ds.SOURCES, made from a tree with the contents the real ones have."""
    def under(*parts):
        folder = os.path.join(tree, *parts)
        return {os.path.relpath(os.path.join(d, f), os.path.join(tree, *parts[:-1])): os.path.join(d, f)
                for d, _, names in os.walk(folder) for f in names}

    def flat(*paths):
        return {os.path.basename(p): os.path.join(tree, p) for p in paths}
    vqa = lambda *splits, kind="questions": flat(*[  # noqa: E731
        f"vqa/v2_OpenEnded_mscoco_{s}_questions.json" if kind == "questions" else f"vqa/v2_mscoco_{s}_annotations.json"
        for s in splits])
    contents = {
        "train2014.zip": under("coco", "train2014"), "val2014.zip": under("coco", "val2014"),
        "test2015.zip": under("coco", "test2015"), "annotations_trainval2014.zip": under("coco", "annotations"),
        "caption_datasets.zip": flat("karpathy/dataset_coco.json", "karpathy/dataset_flickr30k.json"),
        "images.zip": under("vg", "VG_100K"), "images2.zip": under("vg", "VG_100K_2"),
        "region_descriptions.json.zip": flat("vg/region_descriptions.json"),
        "image_data.json.zip": flat("vg/image_data.json"),
        "v2_Questions_Train_mscoco.zip": vqa("train2014"), "v2_Questions_Val_mscoco.zip": vqa("val2014"),
        "v2_Questions_Test_mscoco.zip": vqa("test-dev2015", "test2015"),
        "v2_Annotations_Train_mscoco.zip": vqa("train2014", kind="annotations"),
        "v2_Annotations_Val_mscoco.zip": vqa("val2014", kind="annotations")}
    return {name: zip_folder(files) for name, files in contents.items()}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return official_archives(make_tree(tmp_path_factory.mktemp("tree")))


@pytest.fixture
def server(archives, monkeypatch):
    """A local server with every archive; the md5s of the SOURCES table set to those of the test archives
    (where a real md5 is published; the others stay size + CRC checked)."""
    served = FileServer(archives)
    sources = copy.deepcopy(ds.SOURCES)
    for source in sources.values():
        for spec in source["files"]:
            if spec["md5"]:
                spec["md5"] = hashlib.md5(archives[os.path.basename(spec["url"])]).hexdigest()
    monkeypatch.setattr(ds, "SOURCES", sources)
    yield served
    served.close()


def test_download_unpacks_into_the_layout_verify_accepts(tmp_path, server, capsys):
    root = str(tmp_path / "data")
    rc = ds.main(["download", "all", "--root", root, "--base-url", server.url])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert not os.listdir(os.path.join(root, "downloads"))   # archives removed, nothing half-done
    assert not [d for sub in ("coco", "vg", "vqa", "karpathy") for d in os.listdir(os.path.join(root, sub))
                if d.startswith(".unpacking")]
    verify_line = next(line for line in out.splitlines() if "pixel_bert.datasets verify" in line)
    flags = shlex.split(verify_line)[4:]
    assert flags == [x for d, p in ds.layout_flags(root).items() for x in (f"--{d.replace('_', '-')}", p)]
    rc, verified, _ = run_verify(capsys, flags)
    assert rc == 0, verified
    assert "vqa test-dev2015" not in verified and "absent" not in verified   # the test questions are there too
    # A second run finds everything in place and fetches nothing.
    before = len(server.requests)
    assert ds.main(["download", "coco", "vg", "--root", root, "--base-url", server.url]) == 0
    assert len(server.requests) == before
    assert "already unpacked" in capsys.readouterr().err


def test_download_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, server, capsys, monkeypatch):
    root = str(tmp_path / "data")
    spec = next(s for s in ds.SOURCES["coco"]["files"] if s["url"].endswith("val2014.zip"))
    monkeypatch.setitem(spec, "md5", "0" * 32)
    rc = ds.main(["download", "coco", "--root", root, "--base-url", server.url])
    err = capsys.readouterr().err
    assert rc == 1
    assert "val2014.zip: md5 " in err and "published md5 is 00000000" in err and "failed: val2014.zip" in err
    assert not os.path.exists(os.path.join(root, "downloads", "val2014.zip"))
    assert not os.path.exists(os.path.join(root, "downloads", "val2014.zip.part"))
    assert not os.path.exists(os.path.join(root, "coco", "val2014"))
    assert os.path.isdir(os.path.join(root, "coco", "train2014"))   # the other archives went on


def test_download_interrupted_resumes_with_http_range(tmp_path, server, archives, capsys):
    root = str(tmp_path / "data")
    archive, size = "caption_datasets.zip", len(archives["caption_datasets.zip"])
    server.cut_once.add(archive)
    rc = ds.main(["download", "karpathy", "--root", root, "--base-url", server.url, "--retries", "0"])
    err = capsys.readouterr().err
    part = os.path.join(root, "downloads", archive + ".part")
    assert rc == 1 and "run the same command again to resume" in err
    assert os.path.getsize(part) == size // 2 and not os.path.exists(os.path.join(root, "karpathy"))
    rc = ds.main(["download", "karpathy", "--root", root, "--base-url", server.url, "--retries", "0"])
    assert rc == 0, capsys.readouterr().err
    assert server.requests[-1] == (archive, f"bytes={size // 2}-")
    assert os.path.isfile(os.path.join(root, "karpathy", "dataset_coco.json"))
    # Within one run: the drop is retried from where it stopped.
    root2 = str(tmp_path / "again")
    server.cut_once.add(archive)
    assert ds.main(["download", "karpathy", "--root", root2, "--base-url", server.url]) == 0
    assert server.requests[-2:] == [(archive, None), (archive, f"bytes={size // 2}-")]


def test_download_whole_part_file_is_checked_and_used(tmp_path, server, archives, capsys):
    """A transfer that ended just before the rename: the server answers 416 to the Range request."""
    root = str(tmp_path / "data")
    os.makedirs(os.path.join(root, "downloads"))
    with open(os.path.join(root, "downloads", "val2014.zip.part"), "wb") as f:
        f.write(archives["val2014.zip"])
    spec = next(s for s in ds.SOURCES["coco"]["files"] if s["url"].endswith("val2014.zip"))
    ds.fetch_source(spec, root, server.url, retries=0, keep_archive=False, every=5.0, log=print)
    assert server.requests == [("val2014.zip", f"bytes={len(archives['val2014.zip'])}-")]
    assert os.path.isfile(coco_path(root, "val2014", 5))


def test_download_corrupt_archive_without_md5_is_deleted(tmp_path, server, archives, capsys):
    root = str(tmp_path / "data")
    good = archives["image_data.json.zip"]
    member_start = good.index(b"image_data.json") + len(b"image_data.json")
    broken = bytearray(good)
    broken[member_start + 5] ^= 0xFF   # same size, one flipped byte in the compressed data
    server.files["image_data.json.zip"] = bytes(broken)
    rc = ds.main(["download", "vg", "--root", root, "--base-url", server.url])
    err = capsys.readouterr().err
    assert rc == 1 and "image_data.json.zip: corrupt archive" in err
    assert not os.path.exists(os.path.join(root, "vg", "image_data.json"))
    assert not os.path.exists(os.path.join(root, "downloads", "image_data.json.zip"))
    assert not [d for d in os.listdir(os.path.join(root, "vg")) if d.startswith(".unpacking")]


def test_download_request_only_datasets_print_instructions_without_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("no network access expected")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = str(tmp_path)
    assert ds.main(["download", "flickr30k", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "forms.illinois.edu" in out and f"{root}/flickr30k/flickr30k-images/" in out
    assert ds.main(["download", "nlvr2", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "github.com/lil-lab/nlvr" in out and f"--nlvr2-root {root}/nlvr2/data" in out


def test_download_dry_run_lists_and_fetches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("dry run fetched"))
    root = str(tmp_path)
    assert ds.main(["download", "vg", "--root", root, "--dry-run", "--base-url", "http://mirror.example/x/"]) == 0
    out = capsys.readouterr().out
    assert out.count("to fetch") == 4 and "http://mirror.example/x/images2.zip" in out
    assert "size + CRC-32 (no md5 published)" in out
    assert not os.listdir(root)
