"""See what the model sees: an attention explorer in the browser (Sec. 4.4 of the paper).

    python -m pixel_bert.explore --checkpoint runs/demo/model        # prints http://127.0.0.1:8000/
    python -m pixel_bert.explore --checkpoint runs/demo/model --image scene.png \\
        --text "a red circle" --html attention.html                # one file, opens with no server

The page shows an image (a built-in scene of the synthetic shapes world, drawn at the model's image
size, or an upload) and a sentence. Under the mouse, a word's attention over the feature pixels is
laid over the image as a heat map, on the feature grid's true extent (`AttentionMaps.extent`:
padded cells are never stretched over the image, as in `pixel_bert.visualize`); a slider picks
the layer, a menu one head or the mean of the heads. Clicking a feature cell shows the reverse
direction: which words attend to that cell, and which words the cell attends to (pixel-to-text
attention). Each word shows the share of its attention that goes to pixels at all; the page also
shows the ITM score (pre-training checkpoints), the top fill-ins of each ``[MASK]`` and, for a VQA
checkpoint, the top answers.

Each (image, sentence) costs one forward pass (`PixelBertPredictor.inspect`): the page receives
every layer's and head's text-to-pixel and pixel-to-text attention at once, as float16 arrays in
base64, and everything after that is drawn in the browser. The server is the standard library's
`http.server` (one thread per request, one lock around the model); the page is plain HTML, CSS and
JavaScript in ``pixel_bert/explore_static/``, shipped with the package: no dependency, no CDN, no
build step. It listens on 127.0.0.1 unless ``--host`` says otherwise. docs/explorer.md describes
the page.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import synthetic
from .cli import add_debug_argument, int_at_least, run_cli
from .images import ImageLoadError, load_image
from .inference import Inspection, PixelBertPredictor

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore_static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
# The only files the server sends, by bare name: a URL is looked up here, never joined to a path,
# so no request can reach a file outside the static folder.
STATIC_FILES = {name: os.path.join(STATIC_DIR, name) for name in sorted(os.listdir(STATIC_DIR))
                if os.path.splitext(name)[1] in CONTENT_TYPES}
# Sent with the served page: its scripts, styles and requests come from this server only.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'")
# The written HTML file carries everything inline and needs nothing from anywhere.
FILE_CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src data: blob:; base-uri 'none'; form-action 'none'")

DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_MB = 16.0
MAX_TEXT_CHARS = 2000          # far beyond any model's max_text_len; bounds the tokenizer's work
DRAIN_LIMIT = 64 * 1024 ** 2   # an oversized body up to this is read and dropped so the 413 reaches the page
DEMO_WORLD_SEED = 12345        # the demo trains on world 0 and evaluates on world 1: these scenes are new to it
DEFAULT_CHECKPOINTS = ("runs/demo/model", "runs/demo/model.pt")  # what `python train.py` writes
HOW_TO_TRAIN = ("train one with `python train.py` (the CPU demo, minutes; it writes runs/demo/model.pt and "
                "runs/demo/model/), then run `python -m pixel_bert.explore --checkpoint runs/demo/model`")


class ExploreError(ValueError):
    """Bad input from the page: the message is shown there; ``status`` is the HTTP status (400, 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- the payload: every layer and head, float16 in base64 -----------------------------------------

def encode_array(values) -> Dict[str, object]:
    """A tensor or array as ``{"shape", "dtype": "float16", "data": base64 of little-endian float16}``:
    half the bytes of float32, and attention probabilities need no more than float16's 3 digits."""
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32).astype("<f2"))
    return dict(shape=list(array.shape), dtype="float16", data=base64.b64encode(array.tobytes()).decode("ascii"))


def decode_array(encoded: Dict[str, object]) -> np.ndarray:
    """The inverse of `encode_array` (a float32 array), as the page's JavaScript decodes it."""
    raw = base64.b64decode(encoded["data"])
    return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(encoded["shape"])


def image_data_url(image: Image.Image) -> str:
    """The image as a data: URL: PNG (exact pixels) for small images, JPEG for large ones."""
    buffer = io.BytesIO()
    if image.width * image.height <= 512 * 512:
        image.save(buffer, format="PNG")
        kind = "png"
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_payload(inspection: Inspection, model_view: Image.Image, text: str, source: str,
                  notices: Sequence[str] = ()) -> Dict[str, object]:
    """What the page receives for one (image, sentence): the tokens, the grid and its extent, both
    directions of attention for every layer and head (float16), the heads' outputs, the image as
    the model saw it (after the resize), and notices (a cut sentence, unknown words)."""
    num_layers, num_heads = inspection.text_to_pixels.shape[:2]
    return dict(
        text=text, source=source, tokens=inspection.tokens,
        grid=list(inspection.grid), image_size=list(inspection.image_size), stride=inspection.stride,
        extent=list(inspection.extent), valid=[bool(v) for v in inspection.valid.tolist()],
        layers=int(num_layers), heads=int(num_heads),
        text_to_pixels=encode_array(inspection.text_to_pixels),
        pixels_to_text=encode_array(inspection.pixels_to_text),
        itm=inspection.itm,
        fill_mask=None if inspection.fill_mask is None else [
            dict(position=pos, top=[[w, p] for w, p in top]) for pos, top in inspection.fill_mask],
        answers=None if inspection.answers is None else [[a, p] for a, p in inspection.answers],
        image=image_data_url(model_view), notices=list(notices))


# ---- demo scenes ---------------------------------------------------------------------------------

@dataclass
class DemoScene:
    """A built-in scene of the synthetic world: its picture, sentences to try, its shapes' boxes."""
    name: str
    scene: synthetic.Scene
    image: Image.Image
    suggestions: List[str]


def _suggestions(scene: synthetic.Scene, task: str) -> List[str]:
    """Sentences this scene makes true, in the words of the model's task."""
    first = scene.shapes[0]
    if task == "vqa":
        return [f"what colour is the {first.kind} ?", "how many shapes are there ?",
                f"what is the {first.colour} shape ?"]
    if len(scene.shapes) == 1:
        return [f"a {synthetic.describe(first)}", f"the {first.colour} shape is a [MASK]",
                f"the {first.kind} is [MASK]"]
    listed = ", ".join(f"a {synthetic.describe(s)}" for s in scene.shapes[:-1])
    second = scene.shapes[1]
    last = synthetic.describe(scene.shapes[-1])
    return [f"{synthetic.NUMBER_WORDS[len(scene.shapes)]} shapes: {listed} and a {last}",
            f"a {synthetic.describe(first)} {synthetic.relation(first, second)} a {synthetic.describe(second)}",
            f"the [MASK] shape is a {second.kind}"]


def demo_scenes(image_size: int, task: str = "pretrain", seed: int = DEMO_WORLD_SEED) -> List[DemoScene]:
    """Four scenes of the world ``seed`` at ``image_size`` pixels (the model's own image side): the
    first two of one shape, then the first of two and of three shapes (deterministic)."""
    wanted, found, index = [1, 1, 2, 3], [], 0
    while wanted:
        scene = synthetic.scene_for(seed, index, image_size)
        if len(scene.shapes) == wanted[0]:
            wanted.pop(0)
            name = ", ".join(synthetic.describe(s) for s in scene.shapes)
            found.append(DemoScene(name, scene, synthetic.render(scene), _suggestions(scene, task)))
        index += 1
    return found


# ---- the explorer without HTTP --------------------------------------------------------------------

class Explorer:
    """The model (behind a lock: one forward pass at a time), the demo scenes and the limits.

    `analyse` turns one request of the page into its payload or raises `ExploreError` with a
    message for the page; the HTTP handler only moves bytes."""

    def __init__(self, predictor: PixelBertPredictor, max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 1024 ** 2),
                 top_k: int = 5):
        self.predictor = predictor
        self.max_request_bytes = int(max_request_bytes)
        self.top_k = top_k
        self.lock = threading.Lock()
        self.scenes = demo_scenes(predictor.config.image_short_side, predictor.task)

    def info(self, with_scenes: bool = True) -> Dict[str, object]:
        """What the page needs before its first request: the model's sizes and heads, the limits,
        and (for the served page) the demo scenes as pictures with sentences to try."""
        cfg, model = self.predictor.config, self.predictor.model
        info = dict(
            model=dict(source=str(self.predictor.source), task=self.predictor.task, layers=cfg.num_layers,
                       heads=cfg.num_heads, image_side=[cfg.image_short_side, cfg.image_long_side],
                       stride=cfg.feature_stride, max_text_len=cfg.max_text_len,
                       itm=hasattr(model, "itm"), mlm=hasattr(model, "mlm"),
                       vqa=hasattr(model, "vqa") and self.predictor.answers is not None),
            max_request_bytes=self.max_request_bytes, max_text_chars=MAX_TEXT_CHARS)
        if with_scenes:
            info["scenes"] = [dict(name=s.name, image=image_data_url(s.image), suggestions=s.suggestions,
                                   shapes=[dict(colour=sh.colour, kind=sh.kind, box=list(sh.box))
                                           for sh in s.scene.shapes]) for s in self.scenes]
        return info

    def _text(self, text) -> str:
        if not isinstance(text, str):
            raise ExploreError(f"the sentence must be text, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise ExploreError("the sentence is empty: type a few words to see where each of them looks")
        if len(text) > MAX_TEXT_CHARS:
            raise ExploreError(f"the sentence has {len(text):,} characters, more than this page takes "
                               f"({MAX_TEXT_CHARS:,}); the model reads at most {self.predictor.config.max_text_len} "
                               "tokens anyway")
        return text

    def _upload(self, data, filename: str) -> Image.Image:
        """An uploaded file (base64) through the project's image loader, with its guards: anything
        Pillow cannot decode is refused, and so is a decompression bomb (`pixel_bert.images.load_image`)."""
        if not isinstance(data, str):
            raise ExploreError("the upload must be the file's bytes in base64")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ExploreError(f"{filename}: the upload is not valid base64") from None
        if not raw:
            raise ExploreError(f"{filename}: the file is empty")
        # load_image reads a path (it names the file in its errors): the bytes go to a private temp file
        handle, path = tempfile.mkstemp(prefix="pixel_bert_upload_")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(raw)
            try:
                return load_image(path)
            except ImageLoadError as err:
                message = str(err)
                message = message[len(path) + 2:] if message.startswith(path + ": ") else message
                raise ExploreError(f"{filename}: {message.replace(path, filename)}") from None
        finally:
            os.remove(path)

    def _notices(self, inspection: Inspection, text: str) -> List[str]:
        notices = []
        if inspection.cut_tokens:
            limit, cut = self.predictor.config.max_text_len, inspection.cut_tokens
            shown = " ".join(cut[:30]) + (f" ... ({len(cut) - 30} more)" if len(cut) > 30 else "")
            notices.append(f"the sentence is {inspection.full_length} tokens long ([CLS] and [SEP] included) and "
                           f"this model reads at most {limit}, so its last {len(cut)} were cut: \u201c{shown}\u201d")
        unknown = [w for w in text.split() if self.predictor.tokenizer.unk_id in
                   [self.predictor.tokenizer.token_to_id(t) for t in self.predictor.tokenizer.tokenize(w)]]
        if unknown:
            notices.append(f"not in the model's vocabulary, read as [UNK]: {', '.join(unknown[:12])}"
                           + (" ..." if len(unknown) > 12 else ""))
        return notices

    def analyse_image(self, image: Image.Image, text: str, source: str) -> Dict[str, object]:
        """The payload for a loaded image and a sentence: one forward pass, under the model's lock."""
        text = self._text(text)
        with self.lock:
            started = time.perf_counter()
            inspection = self.predictor.inspect(image, text, top_k=self.top_k)
            seconds = time.perf_counter() - started
        # the picture the model saw: the keep-ratio resize of its transform
        model_view = image.convert("RGB").resize(tuple(inspection.image_size), Image.Resampling.BILINEAR)
        payload = build_payload(inspection, model_view, text, source, self._notices(inspection, text))
        payload["seconds"] = round(seconds, 4)
        return payload

    def analyse(self, request) -> Dict[str, object]:
        """One request of the page: ``{"text", "scene": index}`` or ``{"text", "image": base64, "filename"}``."""
        if not isinstance(request, dict):
            raise ExploreError("the request must be a JSON object with a sentence and an image")
        text = self._text(request.get("text"))
        if request.get("image") is not None:
            filename = str(request.get("filename") or "the uploaded file")[:200]
            return self.analyse_image(self._upload(request["image"], filename), text, filename)
        scene = request.get("scene")
        if isinstance(scene, bool) or not isinstance(scene, int) or not 0 <= scene < len(self.scenes):
            raise ExploreError(f"pick one of the {len(self.scenes)} scenes or upload an image "
                               f"(got scene {scene!r})")
        return self.analyse_image(self.scenes[scene].image, text, f"scene {scene + 1}: {self.scenes[scene].name}")


# ---- HTTP ----------------------------------------------------------------------------------------

class ExplorerHandler(BaseHTTPRequestHandler):
    """GET / and the static files by name, GET /api/info, POST /api/analyse; errors as JSON messages."""
    server_version = "pixel-bert-explore"

    def _send(self, status: int, body: bytes, content_type: str, extra: Sequence[Tuple[str, str]] = ()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, json.dumps(payload, separators=(",", ":")).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, dict(error=message))

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/api/info":
            return self._json(200, self.server.explorer.info())
        name = "index.html" if path == "/" else path[1:]
        if name not in STATIC_FILES:
            return self._error(404, f"no such page: {path}")
        with open(STATIC_FILES[name], "rb") as f:
            body = f.read()
        self._send(200, body, CONTENT_TYPES[os.path.splitext(name)[1]],
                   [("Content-Security-Policy", CONTENT_SECURITY_POLICY)])

    do_HEAD = do_GET

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path != "/api/analyse":
            return self._error(404, f"no such endpoint: POST {self.path}")
        limit = self.server.explorer.max_request_bytes
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:  # no length (or chunked): the body could not be bounded before reading it
            self.close_connection = True
            return self._error(411, "the request needs a Content-Length")
        if length > limit:
            if length <= DRAIN_LIMIT:  # read and drop it, so the client is not reset before it reads the 413
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(1 << 16, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            self.close_connection = True
            return self._error(413, f"the request is {length / 1024 ** 2:.1f} MB, more than this server takes "
                                    f"({limit / 1024 ** 2:.1f} MB, --max-request-mb): choose a smaller image")
        started = time.perf_counter()
        try:
            request = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._error(400, "the request is not JSON")
        try:
            payload = self.server.explorer.analyse(request)
        except ExploreError as err:
            self._log_api(err.status, started)
            return self._error(err.status, str(err))
        except Exception as err:  # noqa: BLE001 - one bad request must not take the page or the server down
            traceback.print_exc(file=sys.stderr)
            return self._error(500, f"the model failed on this input ({type(err).__name__}: {err}); "
                                    "the server keeps running")
        self._log_api(200, started)
        self._json(200, payload)

    def _log_api(self, status: int, started: float) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} POST /api/analyse {status} "
                             f"{time.perf_counter() - started:.2f} s\n")

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass  # API requests are logged by _log_api; static files need no line each


class ExplorerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the `Explorer` its handlers use."""
    daemon_threads = True

    def __init__(self, address, explorer: Explorer, quiet: bool = False):
        super().__init__(address, ExplorerHandler)
        self.explorer = explorer
        self.quiet = quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{port}/" if ":" not in host else f"http://[{host}]:{port}/"


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                quiet: bool = False) -> ExplorerServer:
    """The explorer's server bound to ``host:port`` (port 0: any free port); call serve_forever()."""
    return ExplorerServer((host, port), explorer, quiet)


# ---- one self-contained HTML file ------------------------------------------------------------------

def _static_text(name: str) -> str:
    with open(STATIC_FILES[name], encoding="utf-8") as f:
        return f.read()


def _inline_json(value) -> str:
    """JSON safe inside a <script> element: '<' is escaped, so no '</script>' can end it early."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def render_html(info: Dict[str, object], payload: Dict[str, object]) -> str:
    """The page with its CSS, its JavaScript and one analysis inline: it works opened from disk."""
    page = _static_text("index.html")
    replacements = {
        '<link rel="stylesheet" href="explorer.css">': f"<style>\n{_static_text('explorer.css')}</style>",
        '<script src="explorer.js"></script>':
            f'<script type="application/json" id="explorer-data">{_inline_json(dict(info=info, result=payload))}'
            f"</script>\n<script>\n{_static_text('explorer.js')}</script>",
        '<meta charset="utf-8">':
            '<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{FILE_CONTENT_SECURITY_POLICY}">',
    }
    for old, new in replacements.items():
        if old not in page:
            raise AssertionError(f"explore_static/index.html lacks {old!r}, which render_html replaces")
        page = page.replace(old, new)
    return page


def write_html(path: str, info: Dict[str, object], payload: Dict[str, object]) -> str:
    """Write `render_html` to ``path`` (folders created) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(info, payload))
    return path


# ---- command line --------------------------------------------------------------------------------

def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pixel_bert.explore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a pixel-bert checkpoint: a model folder (RUN/model/) or a model.pt of train.py or "
                        "finetune.py; default: runs/demo/model (or runs/demo/model.pt) if `python train.py` "
                        "has made it")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only); anything else, e.g. "
                        "0.0.0.0, lets other machines use the model and prints a warning")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port, printed at start)")
    p.add_argument("--max-request-mb", type=positive_float, default=DEFAULT_MAX_REQUEST_MB,
                   help=f"largest request the server reads, in MB; an upload is sent in base64, about 4/3 of "
                        f"the file (default {DEFAULT_MAX_REQUEST_MB:g}); larger requests get HTTP 413")
    p.add_argument("--top-k", type=int_at_least(1), default=5,
                   help="fill-ins per [MASK] and VQA answers shown (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--image", default=None,
                   help="with --text and --html: the image (any format Pillow reads) of the written page")
    p.add_argument("--text", default=None, help="with --image and --html: the sentence of the written page")
    p.add_argument("--html", default=None, metavar="OUT.html",
                   help="write one self-contained HTML file (data, JavaScript and CSS inline) for --image and "
                        "--text, which works opened from disk, and exit instead of serving")
    p.add_argument("--quiet", action="store_true", help="do not log each analysed request to stderr")
    add_debug_argument(p)
    return p


def find_checkpoint(path: Optional[str]) -> str:
    """The checkpoint to load: ``path``, or the demo's when none is given; SystemExit saying how to
    make one when there is none."""
    if path is None:
        for candidate in DEFAULT_CHECKPOINTS:
            if os.path.exists(candidate):
                return candidate
        raise SystemExit(f"error: no --checkpoint given and no {DEFAULT_CHECKPOINTS[0]} here: {HOW_TO_TRAIN}")
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} not found: pass a model folder (RUN/model) or a model.pt, "
                         f"or {HOW_TO_TRAIN}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    page_args = [args.image is not None, args.text is not None, args.html is not None]
    if any(page_args) and not all(page_args):
        parser.error("--image, --text and --html go together: they write one page for that image and sentence")
    checkpoint = find_checkpoint(args.checkpoint)
    try:
        predictor = PixelBertPredictor.from_checkpoint(checkpoint, device=args.device)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise SystemExit(f"error: cannot load checkpoint {checkpoint}: {err}") from None
    explorer = Explorer(predictor, int(args.max_request_mb * 1024 ** 2), args.top_k)
    if args.html is not None:
        try:
            image = load_image(args.image)
            payload = explorer.analyse_image(image, args.text, os.path.basename(args.image))
        except (ImageLoadError, ExploreError) as err:
            raise SystemExit(f"error: {err}") from None
        write_html(args.html, explorer.info(with_scenes=False), payload)
        for notice in payload["notices"]:
            print(f"note: {notice}", file=sys.stderr)
        print(f"wrote {args.html} ({os.path.getsize(args.html) / 1024:.0f} KB): open it in a browser, "
              "no server needed", file=sys.stderr)
        return args.html
    try:
        server = make_server(explorer, args.host, args.port, args.quiet)
    except OSError as err:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {err} (try --port 0)") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: listening on {args.host}: anyone who can reach this machine can use the model "
              "(no authentication); the default --host 127.0.0.1 keeps it to this machine", file=sys.stderr)
    print(f"Pixel-BERT attention explorer for {checkpoint}: {server.url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return None


if __name__ == "__main__":
    run_cli(main)
