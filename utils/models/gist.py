"""The user's own model, from a GitHub gist: a small HTTP client for the gist API (hosts, revisions,
content pins, one deadline for the whole download), then :func:`~utils.models.user_file.load_model_from_file`.

Example::

    >>> model = load_model_from_gist("0123456789abcdef0123@<40-hex revision>#sha256=<64 hex>")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from utils.models.user_file import load_model_from_file

GIST_API_URL = "https://api.github.com"
_GIST_HOSTS = frozenset({"gist.github.com", "gist.githubusercontent.com", "api.github.com"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
GIST_ID = re.compile(r"[0-9a-f]{20,40}|[0-9]{1,12}")  # a gist's id: hex, or an old numeric one
_REVISION = re.compile(r"[0-9a-f]{40}")
_MAX_BYTES = 5_000_000


class GistDownloadError(OSError):
    """Downloading a gist failed; the message gives the HTTP status (when there was one) and a hint."""


def load_model_from_gist(
    gist: str,
    class_name: str | None = None,
    config: dict | None = None,
    *,
    filename: str | None = None,
    timeout: float = 10.0,
    api_url: str = GIST_API_URL,
) -> nn.Module:
    """Download a gist's Python file and build the ``nn.Module`` it defines.

    Example::

        >>> model = load_model_from_gist("https://gist.github.com/someone/0123456789abcdef0123")  # doctest: +SKIP
        >>> model = load_model_from_gist("0123456789abcdef0123@<40-hex revision>#sha256=<64 hex>")  # doctest: +SKIP

    Args:
        gist: a gist id (hex) or its URL on ``gist.github.com`` / ``gist.githubusercontent.com``;
            ``ID@REV`` (or a URL with the revision in it) fetches that revision, not the latest;
            a ``#sha256=HEX`` suffix pins the file's content: anything else is refused unexecuted.
        class_name, config: as for :func:`load_model_from_file`.
        filename: which ``.py`` file of the gist. Default None: its only ``.py`` file.
        timeout: seconds for the whole download (default 10), all requests and redirects together.
        api_url: the GitHub API (default ``https://api.github.com``). Only that host, or a loopback
            address such as ``http://127.0.0.1:8000`` for tests, is accepted.

    Raises:
        ValueError: a URL on another host or not https, an id or revision that is not hex, a bad
            pin, a gist with no or several ``.py`` files (listed), or any error of
            :func:`load_model_from_file`.
        GistDownloadError: the download failed, timed out, was redirected off the gist hosts or
            off https, the reply was not the API's shape, or the content does not match the pin.

    .. warning::
        The gist's code is **executed** on this machine, with your permissions. Load only gists
        you wrote or have read; pin them with ``@REV#sha256=`` so that what runs is what you read.
    """
    call = f"load_model_from_gist({gist!r})"
    base = _checked_api_url(api_url, call)
    ref = _gist_ref(gist, call)
    deadline = _Deadline(timeout, call)
    url = f"{base}/gists/{ref.gist_id}" + (f"/{ref.revision}" if ref.revision else "")
    try:
        listing = json.loads(_fetch(url, deadline, base, call))
    except json.JSONDecodeError as e:
        raise GistDownloadError(f"{call}: {url} did not return JSON ({e}). Is api_url the GitHub API?") from e
    name, entry = _pick_gist_file(_files_of(listing, url, call), filename, call)
    code = entry.get("content")
    if not isinstance(code, str) or entry.get("truncated"):
        raw_url = entry.get("raw_url")
        if not isinstance(raw_url, str) or not raw_url:
            raise GistDownloadError(f"{call}: {url} gave file {name!r} with neither content nor a raw_url.")
        code = _fetch(raw_url, deadline, base, call)
    _check_pin(code, ref.sha256, name, call)
    with tempfile.TemporaryDirectory(prefix=f"gist-{ref.gist_id}-") as folder:
        target = Path(folder) / Path(name).name
        target.write_text(code, encoding="utf-8")
        return load_model_from_file(target, class_name=class_name, config=config)


def _checked_api_url(api_url: str, call: str) -> str:
    parts = urllib.parse.urlsplit(api_url)
    official = parts.scheme == "https" and parts.hostname == "api.github.com"
    loopback = parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK_HOSTS
    if not (official or loopback):
        raise ValueError(
            f"{call}: api_url={api_url!r} is not allowed. Use https://api.github.com, or a loopback "
            f"address such as http://127.0.0.1:8000 for tests."
        )
    return api_url.rstrip("/")


@dataclass(frozen=True)
class _GistRef:
    gist_id: str
    revision: str | None = None
    sha256: str | None = None


def _gist_ref(gist: str, call: str) -> _GistRef:
    """``ID``, ``ID@REV``, or a gist URL (with a revision in it or not); then ``#sha256=HEX``."""
    text, _, pin = str(gist).strip().partition("#")
    sha256 = None
    if pin:
        sha256 = pin.removeprefix("sha256=")
        if not pin.startswith("sha256=") or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"{call}: '#{pin}' is not a pin: expected #sha256= and 64 lowercase hex digits.")
    gist_id, revision = _url_parts(text, call) if "://" in text else (text.partition("@")[0], text.partition("@")[2] or None)
    if not GIST_ID.fullmatch(gist_id):
        raise ValueError(
            f"{call}: {gist_id!r} is not a gist id: expected 20 to 40 lowercase hex digits "
            f"(or the digits of an old numeric id)."
        )
    if revision is not None and not _REVISION.fullmatch(revision):
        raise ValueError(f"{call}: {revision!r} is not a gist revision: expected 40 lowercase hex digits.")
    return _GistRef(gist_id, revision, sha256)


def _url_parts(text: str, call: str) -> tuple[str, str | None]:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "https" or parts.hostname not in ("gist.github.com", "gist.githubusercontent.com"):
        raise ValueError(
            f"{call}: only https://gist.github.com and https://gist.githubusercontent.com URLs are "
            f"accepted, or a bare gist id."
        )
    seg = [s.removesuffix(".git") for s in parts.path.split("/") if s]
    if parts.hostname == "gist.githubusercontent.com":  # /<user>/<id>/raw[/<rev>]/<file>
        rev = seg[3] if len(seg) >= 5 and seg[2] == "raw" and _REVISION.fullmatch(seg[3]) else None
        return (seg[1] if len(seg) > 1 else ""), rev
    # gist.github.com: /<id>, /<id>/<rev>, /<user>/<id>, /<user>/<id>/<rev>
    if len(seg) == 2 and GIST_ID.fullmatch(seg[0]) and _REVISION.fullmatch(seg[1]):
        return seg[0], seg[1]
    if len(seg) >= 3:
        return seg[1], seg[2]
    return (seg[0] if len(seg) == 1 else seg[1] if seg else ""), None


def _files_of(listing, url: str, call: str) -> dict:
    """The API's ``files``: a dict of file name → dict entry; anything else is one clear error."""
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise GistDownloadError(
            f"{call}: {url} did not answer as the GitHub gist API does (expected an object with a "
            f"'files' object of file entries). Is api_url the GitHub API?"
        )
    return files


def _check_pin(code: str, sha256: str | None, name: str, call: str) -> None:
    if sha256 is None:
        return
    got = hashlib.sha256(code.encode("utf-8")).hexdigest()
    if got != sha256:
        raise GistDownloadError(f"{call}: {name} has sha256 {got}, not the pinned {sha256}; it was not executed.")


class _Deadline:
    """One time limit for a whole download: each socket operation waits at most what is left."""

    def __init__(self, seconds: float, call: str):
        self.seconds, self.call, self.end = seconds, call, time.monotonic() + seconds

    def left(self, url: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise GistDownloadError(f"{self.call}: downloading {url} took longer than timeout={self.seconds} s.")
        return left


class _SameHostsRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to the gist hosts over https (or to the loopback test server)."""

    def __init__(self, base: str):
        self.base = urllib.parse.urlsplit(base)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not _allowed(newurl, self.base):
            raise GistDownloadError(f"Refusing a redirect from {req.full_url} to {newurl}: only https to a gist host.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _allowed(url: str, base) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname in _GIST_HOSTS:
        return parts.scheme == "https"
    return (parts.hostname, parts.port, parts.scheme) == (base.hostname, base.port, base.scheme)


def _fetch(url: str, deadline: _Deadline, base: str, call: str) -> str:
    if not _allowed(url, urllib.parse.urlsplit(base)):
        raise ValueError(f"{call}: refusing to download {url}: only HTTPS from the gist hosts is allowed.")
    opener = urllib.request.build_opener(_SameHostsRedirects(base))
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.github+json",
                                                   "User-Agent": "amp-transformer-notebooks"})
    try:
        with opener.open(request, timeout=deadline.left(url)) as response:
            body = _read(response, deadline, url, call)
    except urllib.error.HTTPError as e:
        raise GistDownloadError(f"{call}: GET {url} failed with HTTP {e.code} {e.reason}. {_hint(e.code)}") from e
    except (urllib.error.URLError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, GistDownloadError):
            raise reason from e
        raise GistDownloadError(
            f"{call}: could not reach {url}: {reason}. Check the network, or download the file and "
            f"use load_model_from_file()."
        ) from e
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GistDownloadError(f"{call}: {url} is not UTF-8 text ({e}).") from e


def _read(response, deadline: _Deadline, url: str, call: str) -> bytes:
    """The body, a chunk at a time, against the deadline (a server dripping bytes cannot stall it)."""
    chunks, size = [], 0
    while True:
        deadline.left(url)
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BYTES:
            raise GistDownloadError(f"{call}: {url} is larger than {_MAX_BYTES} bytes; refusing it.")


def _hint(status: int) -> str:
    if status == 404:
        return "Check the gist id: the gist may be deleted, or the id mistyped."
    if status in (403, 429):
        return ("GitHub's API allows 60 unauthenticated requests an hour; wait, or download the file "
                "and use load_model_from_file().")
    return "Try again later, or download the file and use load_model_from_file()."


def _pick_gist_file(files: dict, filename: str | None, call: str) -> tuple[str, dict]:
    python = sorted(name for name in files if name.endswith(".py"))
    if filename is not None:
        if filename not in files:
            raise ValueError(f"{call}: the gist has no file {filename!r}. It has: {', '.join(sorted(files))}.")
        return filename, files[filename]
    if not python:
        raise ValueError(f"{call}: the gist has no .py file. It has: {', '.join(sorted(files)) or 'no files'}.")
    if len(python) > 1:
        raise ValueError(f"{call}: the gist has several .py files: {', '.join(python)}. Pass filename=.")
    return python[0], files[python[0]]
