"""VLM2Rec's download path (vlm2rec/docs/method.md §5.1) against a local HTTP server that answers like the
Hugging Face hub: `backbone.local_files_only=false` with a hub name fetches the model, the tokenizer and
the image processor into the HF cache, a later offline run loads them from that cache alone, and a
download cut short fails in one line with nothing left that a later run would trust.

The client runs in a subprocess because huggingface_hub reads HF_ENDPOINT when it is imported."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from vlm2rec.encoder import byte_tokenizer, image_processor_for, tiny_vlm

ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "tiny-org/tiny-qwen2-vl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

CLIENT = """
import json, sys, torch
import vlm2rec.backbones as vb
from vlm2rec.catalog import Catalog
from vlm2rec.config import BackboneConfig, LoraSettings
cfg = BackboneConfig(name="qwen2-vl", source=sys.argv[1], local_files_only=sys.argv[2] == "1", image_pixels=3136,
                     lora=LoraSettings(r=4, alpha=8))
problems = vb.missing_requirements(cfg, "cpu")
if problems:
    print(json.dumps({"problems": problems}))
    sys.exit(0)
try:
    embedder = vb.load_hf_embedder(cfg, Catalog(["", "red lamp", "blue kite"], [None, None, None], 56), torch.device("cpu"))
except ConnectionError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(3)
out = embedder.branch("item_text", torch.tensor([1, 2]))
print(json.dumps({"shape": list(out.shape), "row": out[0, :4].tolist(), "longest_edge": embedder.image_processor.size["longest_edge"]}))
"""


class Hub(http.server.ThreadingHTTPServer):
    """Serves one repository folder as `<repo>/resolve/<revision>/<file>` (HEAD and GET, hub headers), and
    its listing under /api/models/<repo>; logs every path; `cut` names files whose body is cut short."""

    def __init__(self, folder: Path):
        self.folder, self.requests, self.cut = folder, [], set()
        super().__init__(("127.0.0.1", 0), HubHandler)


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):      # keep pytest's output clean
        pass

    def _file(self) -> Path | None:
        prefix = f"/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return None
        _, _, name = self.path[len(prefix):].partition("/")
        path = self.server.folder / name.split("?")[0]
        return path if path.is_file() else None

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        tree = f"/api/models/{REPO_ID}/tree/"
        if self.path.startswith(tree):                    # a folder listing: <revision>/<folder>?...
            folder = self.path[len(tree):].split("?")[0].partition("/")[2].strip("/")
            base = self.server.folder / folder
            if not base.is_dir():
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
            entries = [{"type": "file" if p.is_file() else "directory", "path": str(p.relative_to(self.server.folder)),
                        "size": p.stat().st_size if p.is_file() else 0, "oid": COMMIT} for p in sorted(base.iterdir())]
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
        if self.path.startswith(f"/api/models/{REPO_ID}"):
            listing = {"id": REPO_ID, "sha": COMMIT, "siblings": [{"rfilename": p.name}
                                                                 for p in sorted(self.server.folder.iterdir())]}
            return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        path = self._file()
        if path is None:
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
        data = path.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        if path.name in self.server.cut and body:
            data = data[: len(data) // 2]          # the connection drops half-way through the body
        self._send(200, data, headers, body, length_set=True)

    def _send(self, status: int, data: bytes, headers: dict, body: bool, length_set: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if not length_set:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def hub(tmp_path):
    """A tiny Qwen2-VL saved as a hub repository (model, tokenizer, image processor), served on 127.0.0.1."""
    folder = tmp_path / "repo"
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    tiny_vlm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor_for(3136).save_pretrained(folder)
    server = Hub(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client(tmp_path, endpoint: str, offline: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", CLIENT, REPO_ID, "1" if offline else "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
def test_a_hub_name_downloads_model_tokenizer_and_processor_then_loads_offline(hub, tmp_path):
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    first = client(tmp_path, endpoint, offline=False)
    assert first.returncode == 0, first.stderr[-2000:]
    online = json.loads(first.stdout.strip().splitlines()[-1])
    assert online["shape"] == [2, 32] and online["longest_edge"] == 3136
    fetched = {line.split()[1].rsplit("/", 1)[-1] for line in hub.requests if line.startswith("GET")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= fetched
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-qwen2-vl" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "preprocessor_config.json").is_file()
    # The server is gone: an offline run (local_files_only=true, the default) loads from the cache alone.
    hub.shutdown()
    hub.server_close()
    second = client(tmp_path, endpoint, offline=True)
    assert second.returncode == 0, second.stderr[-2000:]
    offline = json.loads(second.stdout.strip().splitlines()[-1])
    assert offline == online                                  # the same weights, the same embedding


@pytest.mark.heavy
def test_a_download_cut_short_fails_and_leaves_no_snapshot_file(hub, tmp_path):
    hub.cut.add("model.safetensors")
    run = client(tmp_path, f"http://127.0.0.1:{hub.server_address[1]}", offline=False)
    assert run.returncode == 3, run.stderr[-2000:]
    error = json.loads(run.stdout.strip().splitlines()[-1])["error"]
    assert error.startswith(f"downloading {REPO_ID} failed") and "\n" not in error and "hf download" in error
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-qwen2-vl" / "snapshots" / COMMIT
    assert not (snapshot / "model.safetensors").exists()    # never a truncated file where a loader would trust it
    # Once the server sends the whole file, the same cache completes and loads (the partial snapshot is
    # completed, not refused, when downloading is allowed).
    hub.cut.clear()
    again = client(tmp_path, f"http://127.0.0.1:{hub.server_address[1]}", offline=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (snapshot / "model.safetensors").is_file()
