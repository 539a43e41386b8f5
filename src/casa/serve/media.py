"""Media a client names or sends: files in the allowed directory, images in
data URLs, uploaded videos. Everything here refuses bad input with a
`MediaError` that carries the HTTP status and names the input.

Design decisions:
- Local files are readable only inside the operator's `--media-dir`. A name
  (relative to it, absolute, or a `file://` URL) is resolved with every
  symlink followed and `..` collapsed, *then* checked to lie inside the
  directory's own resolved path: `..`, absolute paths elsewhere and symlinks
  pointing out are all refused with 403, before anything is opened, and
  whether or not the target exists. Without `--media-dir` no local file is
  readable at all.
- The server never fetches a remote URL (http/https): an image comes as a
  data URL or as a file in the media directory.
- Images are decoded from PNG, JPEG, WebP, GIF and BMP only (Pillow's
  `formats=`): Pillow otherwise tries every plugin it knows, EPS through
  Ghostscript included. A data URL must declare one of these types; its bytes
  may be any of the five (clients label JPEGs as PNGs), never another format.
- A request's images are all opened first (header only): each is checked
  against `max_image_pixels`, their sum against `max_request_pixels`, before
  any is decoded (decompression bombs, and many large images in a small body).
- Data URLs follow RFC 2397 and MIME: `;base64` in any case, %-escapes undone,
  whitespace (base64 wrapped over lines) removed before strict decoding.
- A video is probed with PyAV before a session starts: it must have a video
  stream, must not be a still-image format, and its declared duration must be
  within `max_video_seconds` (a video that declares none is cut off at that
  time while decoding). Decoding its first frame (corrupt files) is the
  engine's job, with the same frame source the captioner uses.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from casa.serve.limits import shown

__all__ = ["IMAGE_FORMATS", "IMAGE_TYPES", "VIDEO_SUFFIXES", "MediaDir", "MediaError", "VideoInfo", "check_jpeg",
           "decode_jpeg", "load_images", "open_image", "probe_video"]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ogv")
STILL_IMAGE_FORMATS = ("image2", "apng", "gif", "webp_pipe", "png_pipe", "jpeg_pipe", "bmp_pipe", "tiff_pipe")


class MediaError(ValueError):
    """A refused media input; `status` is the HTTP status to answer with, `what`
    the input as the client named it (where one of several is refused)."""

    def __init__(self, status: int, message: str, *, what: str | None = None):
        super().__init__(message)
        self.status, self.what = status, what


class MediaDir:
    """The directory whose files clients may name (None: no local files)."""

    def __init__(self, root: Path | str | None):
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--media-dir {str(root)!r}: not a directory")
        self.real = None if self.root is None else self.root.resolve()

    def resolve(self, name: str, what: str) -> Path:
        """The real path of file `name` (relative to the directory, or absolute) if it lies inside."""
        named = shown(name)
        if self.real is None:
            raise MediaError(403, f"{what} {named}: local files are disabled (start the server with --media-dir)")
        if not name or "\0" in name:
            raise MediaError(400, f"{what} {named}: not a file name")
        path = Path(name)
        try:
            real = (path if path.is_absolute() else self.real / path).resolve()
            if not real.is_relative_to(self.real):
                raise MediaError(403, f"{what} {named}: outside the media directory (only files under --media-dir "
                                      "are readable; '..' and symlinks pointing out are refused)")
            if not real.is_file():
                raise MediaError(404, f"{what} {named}: no such file in the media directory")
        except OSError as e:  # a name too long, a loop of symlinks: no file the client may read
            raise MediaError(400, f"{what} {named}: not a usable file name ({e.strerror})") from None
        return real

    def videos(self, limit: int = 1000) -> list[str]:
        """Video files under the directory (paths relative to it, sorted), at most `limit`."""
        if self.real is None:
            return []
        found = []
        for folder, dirs, files in os.walk(self.real):  # does not follow symlinked folders
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = Path(folder) / file
                if path.suffix.lower() in VIDEO_SUFFIXES and path.resolve().is_relative_to(self.real):
                    found.append(str(path.relative_to(self.real)))
                    if len(found) >= limit:
                        return found
        return found


# ------------------------------------------------------------------ images
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names: the only plugins ever run
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif", "image/bmp",
               "image/x-ms-bmp")  # what a data URL may declare
_FORMATS_TEXT = "PNG, JPEG, WebP, GIF or BMP"


def _decode_data_url(url: str, what: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError(400, f"{what}: malformed data URL (no ',' after the media type)")
    parts = header.split(";")
    mime = parts[0].strip().lower()
    if not mime.startswith("image/"):
        raise MediaError(400, f"{what}: a data URL of type {shown(mime or 'text/plain')}, not an image "
                              "(expected data:image/png;base64,... or another image type)")
    if mime not in IMAGE_TYPES:
        raise MediaError(400, f"{what}: a data URL of type {shown(mime)}; this server decodes {_FORMATS_TEXT} images "
                              "only")
    if "base64" not in (p.strip().lower() for p in parts[1:]):  # the parameter is case-insensitive
        return urllib.parse.unquote_to_bytes(payload)
    if "%" in payload:  # RFC 2397 data is URL-encoded: clients may escape '=', '+', '/'
        payload = urllib.parse.unquote(payload)
    try:  # MIME base64 is wrapped over lines: whitespace is not data, anything else is checked
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(400, f"{what}: invalid base64 in the data URL ({e})") from None


def _file_url_path(url: str, what: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(400, f"{what}: file URL with host {shown(parsed.netloc)} (only file:///path is supported)")
    return urllib.parse.unquote(parsed.path)


def open_image(url: str, media: MediaDir, *, what: str) -> Image.Image:
    """An image from a data URL or a `file://` URL inside the media directory, its
    header read (size, format) but not decoded; one of `IMAGE_FORMATS` or refused."""
    if not isinstance(url, str) or not url:
        raise MediaError(400, f"{what}: expected a non-empty URL string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        source = io.BytesIO(_decode_data_url(url, what))
    elif scheme == "file":
        source = media.resolve(_file_url_path(url, what), what)
    elif scheme in ("http", "https"):
        raise MediaError(400, f"{what}: the server does not fetch remote URLs; send the image as a data URL "
                              "(data:image/png;base64,...) or a file:// URL inside the media directory")
    else:
        raise MediaError(400, f"{what}: unsupported URL {shown(url)} (expected a data: or file:// URL)")
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise MediaError(400, f"{what}: cannot decode the image: not a {_FORMATS_TEXT} file (the formats this "
                              "server decodes)") from None
    except Image.DecompressionBombError as e:
        raise MediaError(413, f"{what}: {e} (--max-image-pixels)") from None
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as e:  # a header that cannot be read
        raise MediaError(400, f"{what}: cannot decode the image ({e})") from None


def load_images(sources: list[tuple[str, str]], media: MediaDir, *, max_pixels: int,
                max_total_pixels: int) -> list[Image.Image]:
    """RGB images from `(URL, what)` pairs. Every header is read and checked (each
    image against `max_pixels`, their sum against `max_total_pixels`) before any
    image is decoded. A `MediaError` names the image (`what`)."""
    opened: list[tuple[Image.Image, str]] = []
    total = 0
    try:
        for url, what in sources:
            try:
                img = open_image(url, media, what=what)
            except MediaError as e:
                raise MediaError(e.status, str(e), what=what) from None
            opened.append((img, what))
            pixels = img.width * img.height
            if pixels > max_pixels:
                raise MediaError(413, f"{what}: image of {img.width}x{img.height} pixels is above the limit of "
                                      f"{max_pixels} pixels (--max-image-pixels)", what=what)
            total += pixels
            if total > max_total_pixels:
                raise MediaError(413, f"{what}: the request's images reach {total} pixels with this one, above the "
                                      f"limit of {max_total_pixels} pixels per request (--max-request-pixels)",
                                 what=what)
        return [_decode(img, what) for img, what in opened]
    finally:
        for img, _ in opened:
            img.close()


def _decode(img: Image.Image, what: str) -> Image.Image:
    try:
        return img.convert("RGB")
    except (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError) as e:
        raise MediaError(400, f"{what}: cannot decode the image ({e})", what=what) from None


def check_jpeg(data: bytes, *, max_pixels: int, what: str) -> tuple[int, int]:
    """`(width, height)` of a JPEG from its header, not decoded: 400 if it is no JPEG, 413 past `max_pixels`."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            size = img.size
    except Image.UnidentifiedImageError:
        raise MediaError(400, f"{what}: not a JPEG image") from None
    except Image.DecompressionBombError as e:
        raise MediaError(413, f"{what}: {e} (--max-image-pixels)") from None
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as e:
        raise MediaError(400, f"{what}: cannot read the JPEG's header ({e})") from None
    if size[0] * size[1] > max_pixels:
        raise MediaError(413, f"{what}: image of {size[0]}x{size[1]} pixels is above the limit of {max_pixels} "
                              "pixels (--max-image-pixels)")
    return size


def decode_jpeg(data: bytes, *, what: str) -> Image.Image:
    """A JPEG (its header checked by `check_jpeg`) decoded to RGB; 400 if its data cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            return img.convert("RGB")
    except (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError) as e:
        raise MediaError(400, f"{what}: cannot decode the image ({e})") from None


# ------------------------------------------------------------------ videos
@dataclass
class VideoInfo:
    duration: float | None  # seconds, as the container declares it
    width: int
    height: int


def probe_video(path: Path, *, max_seconds: float, what: str) -> VideoInfo:
    """Check that `path` is a video within the duration limit (see the module doc)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(415, f"{what}: not a video file ({e})") from None
    with container:
        if container.format.name in STILL_IMAGE_FORMATS:
            raise MediaError(415, f"{what}: an image ({container.format.name}), not a video")
        if not container.streams.video:
            raise MediaError(415, f"{what}: no video stream (an audio or data file, or an empty container)")
        stream = container.streams.video[0]
        duration = None
        if container.duration:
            duration = container.duration / 1e6  # microseconds
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if duration is not None and duration > max_seconds:
            raise MediaError(413, f"{what}: the video is {duration:.1f} s long; the limit is {max_seconds:g} s "
                                  "(--max-video-seconds)")
        return VideoInfo(duration, stream.codec_context.width, stream.codec_context.height)
