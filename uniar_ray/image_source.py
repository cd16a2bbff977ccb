"""An input image named on a command line: a local file, or an http(s) URL as the reference's chat.py takes one,
read with a size limit and a deadline. Errors are one line naming the option, the source and what went wrong.

    data = read_image_source("https://example.com/cat.jpg", "--image")   # bytes; ImageSourceError says why not
    data, picture = open_image_source("apple.png", "--image")             # and decoded (RGB), or ImageSourceError
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from uniar_ray.data import DataError

if TYPE_CHECKING:
    from PIL import Image

MAX_BYTES = 64 * 2**20  # the rewards' max_image_bytes: no input image is larger
TIMEOUT_S = 30.0  # connect, each read, and the whole download
URL_SCHEMES = ("http", "https")


class ImageSourceError(DataError):
    """An input image that cannot be read: missing, too large, or a URL that does not answer with one."""


def is_url(source: str) -> bool:
    return "://" in source


def read_image_source(source: str, option: str = "--image", max_bytes: int | None = None,
                      timeout_s: float | None = None) -> bytes:
    """The bytes of a local file or of an http(s) URL (redirects only to http(s); proxies from the environment).
    Limits: ``max_bytes`` (default MAX_BYTES) and ``timeout_s`` (default TIMEOUT_S) for connecting, each read and the
    whole download."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    if is_url(source):
        scheme = source.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise ImageSourceError(f"{option} {source}: {scheme}:// is not supported; give a local file or an "
                                   "http(s) URL")
        return _download(source, option, max_bytes, timeout_s)
    path = Path(source)
    if not path.is_file():
        raise ImageSourceError(f"{option} {source}: no such file")
    if path.stat().st_size > max_bytes:
        raise ImageSourceError(f"{option} {source}: {path.stat().st_size} bytes, over the {max_bytes}-byte limit")
    return path.read_bytes()


def open_image_source(source: str, option: str = "--image", **limits) -> tuple[bytes, "Image.Image"]:
    """``read_image_source``, then decoded to an RGB image: a file or answer that is not a readable image (truncated,
    not an image, a decompression bomb) is an ImageSourceError too."""
    from uniar_ray.rollout.images import decode_image

    data = read_image_source(source, option, **limits)
    try:
        return data, decode_image(data)
    except ValueError as e:
        raise ImageSourceError(f"{option} {source}: {e}") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if newurl.split("://", 1)[0].lower() not in URL_SCHEMES:
            raise urllib.error.URLError(f"redirected to {newurl}, which is not an http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, option: str, max_bytes: int, timeout_s: float) -> bytes:
    where = f"{option} {url}"
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "uniar-ray", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageSourceError(f"{where}: the server announces {declared} bytes, over the {max_bytes}-byte "
                                       "limit")
            data = bytearray()
            while chunk := resp.read1(1 << 16):  # one socket read at a time: the deadline is checked in between
                data += chunk
                if len(data) > max_bytes:
                    raise ImageSourceError(f"{where}: more than {max_bytes} bytes; not an input image")
                if time.monotonic() > deadline:
                    raise ImageSourceError(f"{where}: the download took more than {timeout_s:g} s; download it "
                                           "yourself and give the file")
    except ImageSourceError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageSourceError(f"{where}: the server answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageSourceError(f"{where}: cannot fetch it ({e.reason})") from None
    except TimeoutError:
        raise ImageSourceError(f"{where}: no answer within {timeout_s:g} s") from None
    except (OSError, ValueError) as e:  # a dropped connection, a malformed URL or answer
        raise ImageSourceError(f"{where}: cannot fetch it ({type(e).__name__}: {e})") from None
    if not data:
        raise ImageSourceError(f"{where}: the server sent no bytes")
    return bytes(data)
