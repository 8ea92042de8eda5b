"""Acquisition of raw data: streamed, checksummed downloads and atomic zip extraction (stdlib urllib).

Used by the prepare step (`python -m common.prepare NAME`, or a paper's data loading when a file is
missing); tests exercise it against a local HTTP server only. Every failure is one line naming the URL or
file; a failed or unverified download leaves nothing at the destination (data goes to a temp file that
is renamed only once its length and checksums are verified).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from common.io import atomic_write

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike, crlf_as_lf: bool = False) -> str:
    """sha256 hex digest of a file; crlf_as_lf hashes the text with CRLF line ends turned into LF."""
    digest = hashlib.sha256()
    if crlf_as_lf:  # whole-file read: a CRLF pair may straddle chunk boundaries (files here are small)
        digest.update(Path(path).read_bytes().replace(b"\r\n", b"\n"))
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file (GroupLens archives are known by md5 only)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stream(url: str, handle, timeout: float, desc: str) -> tuple[int, int, dict]:
    """Copy the response body into `handle`; return (bytes read, Content-Length or -1, digests)."""
    request = urllib.request.Request(url, headers={"User-Agent": "repro-recsys-prepare"})
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or -1)
        got = 0
        with tqdm(total=total if total > 0 else None, unit="B", unit_scale=True, desc=desc,
                  disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
            for block in iter(lambda: response.read(CHUNK), b""):
                handle.write(block)
                for digest in digests.values():
                    digest.update(block)
                got += len(block)
                bar.update(len(block))
    return got, total, {k: d.hexdigest() for k, d in digests.items()}


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 10.0,
          md5: str | None = None, hint: str = "") -> Path:
    """Download `url` to `dest` (temp file + rename), verifying length and the given checksums.

    `timeout` bounds the connection and every read, so an offline machine fails within seconds.
    Network failure or a truncated body -> ConnectionError; checksum mismatch -> ValueError. Both are
    one line ending with `hint` (prepare says there which file to put where), and nothing is left behind.
    """
    dest = Path(dest)
    hint = f"; {hint}" if hint else ""
    with atomic_write(dest, "wb") as handle:
        try:
            got, total, digests = _stream(url, handle, timeout, dest.name)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = (f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError)
                      else getattr(err, "reason", None) or err)
            raise ConnectionError(f"cannot download {url} ({reason}){hint}") from None
        if total >= 0 and got != total:
            raise ConnectionError(f"truncated download of {url}: got {got} of {total} bytes{hint}")
        for name, want in (("sha256", sha256), ("md5", md5)):
            if want and digests[name] != want.lower():
                raise ValueError(f"{name} mismatch for {url}: expected {want}, got {digests[name]} "
                                 f"(download deleted){hint}")
    return dest


def unpack(archive: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Extract one zip member to `dest` atomically; `member` may also match a unique basename."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if member not in names:  # archives differ on whether they wrap files in a folder
                matches = [n for n in names if n.rsplit("/", 1)[-1] == member.rsplit("/", 1)[-1]]
                if len(matches) != 1:
                    raise FileNotFoundError(f"{archive}: no member {member} (has {len(names)} members)")
                member = matches[0]
            with atomic_write(dest, "wb") as out, zf.open(member) as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise ValueError(f"{archive}: not a readable zip archive ({err})") from None
    return dest
