"""common/download.py and the prepare step against a local HTTP server on 127.0.0.1 (no internet).

The server serves archives built in the test; it can lie about Content-Length to simulate a cut
connection. Failures must be one line and leave nothing at the destination.
"""
import hashlib
import http.server
import io
import socket
import threading
import time
import zipfile

import pytest

from common.data import read_ml100k
from common.datasets import load_interactions
from common.download import fetch, file_sha256, unpack
from common.prepare import prepare
from common.registry import DATASETS

U_DATA = "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + 7 * u + i}\n" for u in range(1, 7) for i in range(1, 6))


def _zip(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def server():
    """Serve `routes` {path: bytes}; paths starting with /cut/ announce 100 bytes more than they send."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = routes.get(self.path.removeprefix("/cut"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + (100 if self.path.startswith("/cut/") else 0)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_archive_downloads_and_unpacks(server, tmp_path):
    base, routes = server
    archive = _zip({"toy/u.data": U_DATA, "toy/README": "x"})
    routes["/toy.zip"] = archive
    dest = fetch(f"{base}/toy.zip", tmp_path / "dl" / "toy.zip", sha256=hashlib.sha256(archive).hexdigest(),
                 md5=hashlib.md5(archive).hexdigest())
    assert dest.read_bytes() == archive and _leftovers(tmp_path / "dl") == ["toy.zip"]
    out = unpack(dest, "toy/u.data", tmp_path / "raw" / "u.data")
    assert out.read_text() == U_DATA and _leftovers(tmp_path / "raw") == ["u.data"]
    assert unpack(dest, "u.data", tmp_path / "raw2" / "u.data").read_text() == U_DATA  # basename match
    with pytest.raises(FileNotFoundError, match="no member nothere.dat"):
        unpack(dest, "nothere.dat", tmp_path / "raw3" / "x")
    assert _leftovers(tmp_path / "raw3") == []


def test_truncated_download_fails_and_leaves_nothing(server, tmp_path):
    base, routes = server
    routes["/toy.zip"] = _zip({"u.data": U_DATA})
    with pytest.raises(ConnectionError) as err:
        fetch(f"{base}/cut/toy.zip", tmp_path / "toy.zip")
    assert f"{base}/cut/toy.zip" in str(err.value) and "\n" not in str(err.value)
    assert _leftovers(tmp_path) == []


def test_wrong_checksum_deletes_the_download(server, tmp_path):
    base, routes = server
    routes["/toy.zip"] = archive = _zip({"u.data": U_DATA})
    with pytest.raises(ValueError) as err:
        fetch(f"{base}/toy.zip", tmp_path / "toy.zip", sha256="ab" * 32)
    message = str(err.value)
    assert "\n" not in message and f"expected {'ab' * 32}" in message
    assert f"got {hashlib.sha256(archive).hexdigest()}" in message and _leftovers(tmp_path) == []
    with pytest.raises(ConnectionError, match="404"):
        fetch(f"{base}/missing.zip", tmp_path / "missing.zip")
    assert _leftovers(tmp_path) == []


def test_unreachable_url_fails_fast_with_one_line(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as err:
        fetch(f"http://127.0.0.1:{port}/ml-1m.zip", tmp_path / "ml-1m.zip", timeout=2,
              hint="or put ratings.dat at /data/ml-1m/ratings.dat")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message and f"http://127.0.0.1:{port}/ml-1m.zip" in message
    assert "ratings.dat at /data/ml-1m/ratings.dat" in message and _leftovers(tmp_path) == []


def test_file_sha256_can_ignore_crlf(tmp_path):
    (tmp_path / "lf").write_bytes(b"a\tb\nc\n")
    (tmp_path / "crlf").write_bytes(b"a\tb\r\nc\r\n")
    assert file_sha256(tmp_path / "lf") == hashlib.sha256(b"a\tb\nc\n").hexdigest()
    assert file_sha256(tmp_path / "crlf", crlf_as_lf=True) == file_sha256(tmp_path / "lf")
    assert file_sha256(tmp_path / "crlf") != file_sha256(tmp_path / "lf")


@pytest.fixture
def toy_entry(server, monkeypatch):
    base, routes = server
    routes["/toy-100k.zip"] = archive = _zip({"toy-100k/u.data": U_DATA})
    entry = {"kind": "interactions", "dir": "toy-100k", "file": "u.data", "reader": read_ml100k,
             "url": f"{base}/toy-100k.zip", "member": "toy-100k/u.data",
             "archive_md5": hashlib.md5(archive).hexdigest(),
             "sha256": hashlib.sha256(U_DATA.encode()).hexdigest(), "recipe": {},
             "expected": {"users": 6, "items": 5, "interactions": 30}}
    monkeypatch.setitem(DATASETS, "toy-100k", entry)
    return entry


def test_prepare_downloads_verifies_and_builds(toy_entry, tmp_path):
    meta = prepare("toy-100k", root=tmp_path / "empty-root", download_dir=tmp_path / "dl")
    assert meta["stats"]["interactions"] == 30 and meta["raw_sha256"] == toy_entry["sha256"]
    assert (tmp_path / "dl" / "toy-100k" / "u.data").read_text() == U_DATA
    assert not (tmp_path / "empty-root").exists()  # the data root is never written to
    assert load_interactions("toy-100k", root=tmp_path / "dl")["user"].size == 30


def test_prepare_rejects_a_wrong_member_checksum(toy_entry, tmp_path):
    toy_entry["sha256"] = "cd" * 32
    with pytest.raises(ValueError, match=f"sha256 mismatch for toy-100k/u.data .* expected {'cd' * 32}"):
        prepare("toy-100k", root=tmp_path / "empty-root", download_dir=tmp_path / "dl")
    assert not (tmp_path / "dl" / "toy-100k" / "u.data").exists()


def test_prepare_offline_names_url_file_and_place(toy_entry, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        toy_entry["url"] = f"http://127.0.0.1:{sock.getsockname()[1]}/toy-100k.zip"
    with pytest.raises(ConnectionError) as err:
        prepare("toy-100k", root=tmp_path / "root", download_dir=tmp_path / "dl", timeout=2)
    message = str(err.value)
    assert "\n" not in message and toy_entry["url"] in message
    assert f"put u.data (member toy-100k/u.data of toy-100k.zip) at {tmp_path / 'root' / 'toy-100k' / 'u.data'}" \
        in message
    assert _leftovers(tmp_path / "dl" / "toy-100k") == []


def test_an_archive_that_failed_verification_is_fetched_again(toy_entry, server, tmp_path):
    base, routes = server
    good = routes["/toy-100k.zip"]
    routes["/toy-100k.zip"] = _zip({"toy-100k/u.data": U_DATA.replace("\t5\t", "\t4\t", 1)})  # wrong member
    toy_entry["archive_md5"] = None  # the archive itself passes; only its member's sha256 fails
    with pytest.raises(ValueError, match="archive and extracted file deleted"):
        prepare("toy-100k", root=tmp_path / "empty-root", download_dir=tmp_path / "dl")
    assert _leftovers(tmp_path / "dl" / "toy-100k") == []
    routes["/toy-100k.zip"] = good  # the mirror is fixed: the next attempt must download, not reuse
    assert prepare("toy-100k", root=tmp_path / "empty-root", download_dir=tmp_path / "dl")["stats"]["users"] == 6


def test_a_corrupt_archive_left_behind_is_replaced(toy_entry, tmp_path):
    archive = tmp_path / "dl" / "toy-100k" / "toy-100k.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"not a zip")  # e.g. an interrupted copy by hand
    meta = prepare("toy-100k", root=tmp_path / "empty-root", download_dir=tmp_path / "dl")
    assert meta["stats"]["interactions"] == 30 and zipfile.is_zipfile(archive)
