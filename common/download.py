"""Acquisition of raw data: streamed, checksummed downloads and atomic zip extraction (stdlib urllib).

Used by the prepare step (`python -m common.prepare NAME`, or a paper's data loading when a file is
missing); tests exercise it against a local HTTP server only. Every failure is one line naming the URL or
file; a failed or unverified download leaves nothing at the destination (data goes to a temp file that
is renamed only once its length and checksums are verified). Sizes are bounded: a download by `max_bytes`
and the free space of its folder, a zip extraction by its member count, its members' total size, the
extracted member's size, its compression ratio and the free space (a zip bomb is one line, not a full disk).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

from common.io import atomic_write

CHUNK = 1 << 20
MAX_DOWNLOAD = 16 << 30   # bytes: far above any file the projects fetch (the largest, Amazon metadata, ~2 GB)
MAX_MEMBERS = 10_000      # members of a zip archive (GroupLens archives have < 30)
MAX_UNPACKED = 16 << 30   # bytes: all members of an archive together (ml-25m: ~1.2 GB)
MAX_RATIO = 200           # uncompressed / compressed size of one member (rating tables: ~3-10)
SPARE = 64 << 20          # bytes of free space kept beyond what a download or an extraction needs


def check_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Raise ENOSPC naming `folder` when it has less than `need` (+ SPARE) bytes free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + SPARE > free:
        raise OSError(errno.ENOSPC, f"not enough free space for {what} ({need:,} bytes needed, {free:,} free "
                      f"in {probe})", str(folder))


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


class TooLarge(ValueError):
    """A download longer than its bound."""


def _stream(url: str, handle, timeout: float, desc: str, max_bytes: int = MAX_DOWNLOAD,
            folder: Path | None = None) -> tuple[int, int, dict]:
    """Copy the response body into `handle`; return (bytes read, Content-Length or -1, digests)."""
    import urllib.request
    from tqdm import tqdm
    request = urllib.request.Request(url, headers={"User-Agent": "repro-recsys-prepare"})
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with urllib.request.urlopen(request, timeout=timeout) as response:
        try:
            total = int(response.headers.get("Content-Length") or -1)
        except ValueError:
            total = -1
        if total > max_bytes:
            raise TooLarge(f"{url} is {total:,} bytes, more than the {max_bytes:,} allowed")
        if total > 0 and folder is not None:
            check_space(folder, total, f"downloading {url}")
        got = 0
        with tqdm(total=total if total > 0 else None, unit="B", unit_scale=True, desc=desc,
                  disable=None) as bar:  # disable=None: no bar when stderr is not a terminal
            for block in iter(lambda: response.read(CHUNK), b""):
                if got + len(block) > max_bytes:
                    raise TooLarge(f"{url} sent more than the {max_bytes:,} bytes allowed")
                handle.write(block)
                for digest in digests.values():
                    digest.update(block)
                got += len(block)
                bar.update(len(block))
    return got, total, {k: d.hexdigest() for k, d in digests.items()}


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 10.0,
          md5: str | None = None, hint: str = "", size: int | None = None, max_bytes: int = MAX_DOWNLOAD) -> Path:
    """Download `url` to `dest` (temp file + rename), verifying length and the given checksums.

    `timeout` bounds the connection and every read, so an offline machine fails within seconds.
    Network failure or a truncated body -> ConnectionError; checksum mismatch -> ValueError. Both are
    one line ending with `hint` (prepare says there which file to put where), and nothing is left behind.
    `size`: the length the source publishes (checked like a checksum); `max_bytes`: a bound on any length.
    """
    import http.client   # the network modules (≈ 20 ms of imports) only where something is downloaded
    import urllib.error
    dest = Path(dest)
    hint = f"; {hint}" if hint else ""
    if size is not None:
        max_bytes = min(max_bytes, size)
    with atomic_write(dest, "wb") as handle:
        try:
            got, total, digests = _stream(url, handle, timeout, dest.name, max_bytes, dest.parent)
        except TooLarge as err:
            raise ValueError(f"{err} (download deleted){hint}") from None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the disk, not the network
                raise OSError(err.errno, f"{err.strerror} while downloading {url}", str(dest)) from None
            reason = (f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError)
                      else getattr(err, "reason", None) or err)
            raise ConnectionError(f"cannot download {url} ({reason}){hint}") from None
        except (urllib.error.URLError, http.client.HTTPException) as err:
            reason = (f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError)
                      else getattr(err, "reason", None) or err)
            raise ConnectionError(f"cannot download {url} ({reason}){hint}") from None
        if total >= 0 and got != total:
            raise ConnectionError(f"truncated download of {url}: got {got} of {total} bytes{hint}")
        if size is not None and got != size:
            raise ValueError(f"size mismatch for {url}: expected {size:,} bytes, got {got:,} (download deleted){hint}")
        for name, want in (("sha256", sha256), ("md5", md5)):
            if want and digests[name] != want.lower():
                raise ValueError(f"{name} mismatch for {url}: expected {want}, got {digests[name]} "
                                 f"(download deleted){hint}")
    return dest


def unpack(archive: str | os.PathLike, member: str, dest: str | os.PathLike, max_bytes: int = MAX_UNPACKED,
           max_members: int = MAX_MEMBERS, max_ratio: float = MAX_RATIO) -> Path:
    """Extract one zip member to `dest` atomically; `member` may also match a unique basename. Bounded:
    at most `max_members` members and `max_bytes` uncompressed bytes in the archive, a member compressed
    at most `max_ratio` : 1, and the free space of dest's folder; each a one-line error before any byte."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise ValueError(f"{archive}: {len(infos):,} members, more than the {max_members:,} an archive "
                                 "of a data set may have (not the expected archive)")
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise ValueError(f"{archive}: its members unpack to {total:,} bytes, more than the "
                                 f"{max_bytes:,} allowed (not the expected archive)")
            names = [info.filename for info in infos]
            if member not in names:  # archives differ on whether they wrap files in a folder
                matches = [n for n in names if n.rsplit("/", 1)[-1] == member.rsplit("/", 1)[-1]]
                if len(matches) != 1:
                    raise FileNotFoundError(f"{archive}: no member {member} (has {len(names)} members)")
                member = matches[0]
            info = zf.getinfo(member)
            if info.file_size > max_ratio * max(info.compress_size, 1):
                raise ValueError(f"{archive}: member {member} unpacks {info.compress_size:,} bytes into "
                                 f"{info.file_size:,} (more than {max_ratio:g}:1, a zip bomb, not data)")
            check_space(dest.parent, info.file_size, f"extracting {member} of {archive}")
            with atomic_write(dest, "wb") as out, zf.open(member) as src:
                written = 0
                for block in iter(lambda: src.read(CHUNK), b""):
                    written += len(block)
                    if written > info.file_size:  # zipfile stops at the declared size; never trust it alone
                        raise ValueError(f"{archive}: member {member} is longer than its declared size")
                    out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise ValueError(f"{archive}: not a readable zip archive ({err})") from None
    return dest
