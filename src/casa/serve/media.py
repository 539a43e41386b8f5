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
- An image's size is read from its header and checked against
  `max_image_pixels` before it is decoded (decompression bombs).
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
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["VIDEO_SUFFIXES", "MediaDir", "MediaError", "VideoInfo", "load_image", "probe_video"]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ogv")
STILL_IMAGE_FORMATS = ("image2", "apng", "gif", "webp_pipe", "png_pipe", "jpeg_pipe", "bmp_pipe", "tiff_pipe")


class MediaError(ValueError):
    """A refused media input; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class MediaDir:
    """The directory whose files clients may name (None: no local files)."""

    def __init__(self, root: Path | str | None):
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--media-dir {str(root)!r}: not a directory")
        self.real = None if self.root is None else self.root.resolve()

    def resolve(self, name: str, what: str) -> Path:
        """The real path of file `name` (relative to the directory, or absolute) if it lies inside."""
        if self.real is None:
            raise MediaError(403, f"{what} {name!r}: local files are disabled (start the server with --media-dir)")
        if not name or "\0" in name:
            raise MediaError(400, f"{what} {name!r}: not a file name")
        path = Path(name)
        real = (path if path.is_absolute() else self.real / path).resolve()
        if not real.is_relative_to(self.real):
            raise MediaError(403, f"{what} {name!r}: outside the media directory (only files under --media-dir "
                                  "are readable; '..' and symlinks pointing out are refused)")
        if not real.is_file():
            raise MediaError(404, f"{what} {name!r}: no such file in the media directory")
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
def _decode_data_url(url: str, what: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError(400, f"{what}: malformed data URL (no ',' after the media type)")
    parts = header.split(";")
    mime = parts[0].strip().lower()
    if not mime.startswith("image/"):
        raise MediaError(400, f"{what}: a data URL of type {mime or 'text/plain'!r}, not an image "
                              "(expected data:image/png;base64,... or another image type)")
    if "base64" in parts[1:]:
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(400, f"{what}: invalid base64 in the data URL ({e})") from None
    return urllib.parse.unquote_to_bytes(payload)


def _file_url_path(url: str, what: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(400, f"{what}: file URL with host {parsed.netloc!r} (only file:///path is supported)")
    return urllib.parse.unquote(parsed.path)


def load_image(url: str, media: MediaDir, *, max_pixels: int, what: str) -> Image.Image:
    """An RGB image from a data URL or a `file://` URL inside the media directory."""
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
        raise MediaError(400, f"{what}: unsupported URL {url[:40]!r} (expected a data: or file:// URL)")
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise MediaError(413, f"{what}: image of {img.width}x{img.height} pixels is above the limit of "
                                      f"{max_pixels} pixels (--max-image-pixels)")
            return img.convert("RGB")
    except MediaError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # unidentified, truncated, corrupt
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
