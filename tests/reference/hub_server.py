"""A local stand-in for the Hugging Face Hub's file protocol, for tests/hub.rs. Listens on
127.0.0.1 only and serves the repositories of a folder (ROOT/<org>/<name>/... is the tree of
repo `org/name`, one commit: the branch `main`).

usage: hub_server.py ROOT --port-file FILE [--log FILE] [--token T] [--fault KIND:FILE:N]...

What it speaks is what huggingface_hub and the Hub speak:
  GET  /api/models/<repo>/revision/<rev>     {"id", "sha", "siblings": [{"rfilename"}]}
  GET  /api/models/<repo>/tree/<rev>[/<path>]?recursive=true   [{"type", "path", "size", "oid", "lfs"}]
  HEAD/GET /<repo>/resolve/<rev>/<file>      X-Repo-Commit, ETag (git blob sha1) for regular files;
       LFS files (weights) answer 302 to http://localhost:<port>/_lfs/<sha256> with X-Linked-Etag (the sha256) and
       X-Linked-Size, as the Hub redirects to its CDN
  GET  /_lfs/<sha256>                        the bytes, with Range (206, Content-Range)
  POST /api/repos/create                     {"name", "organization", "type"}: 409 when it exists
  POST /api/models/<repo>/preupload/<rev>    {"files": [{"path", "size", "sample"}]} -> uploadMode
  POST /<repo>.git/info/lfs/objects/batch    git-lfs batch API, basic transfer: PUT /_lfs_upload/<oid>
  POST /api/models/<repo>/commit/<rev>       application/x-ndjson: header, file (base64), lfsFile
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and
X-Error-Message, as the Hub's do.

--token T: every /api and /resolve request needs `Authorization: Bearer T` (else 401, GatedRepo).
--fault cut:FILE:N     the first GET of FILE's LFS bytes sends N bytes and closes the connection
--fault corrupt:FILE:K the first K GETs of FILE's LFS bytes have one byte flipped
--fault slow:FILE:MS   each GET of FILE's LFS bytes waits MS milliseconds before answering
--log FILE: one JSON line per request: {"method", "path", "range", "auth"}.
"""
import argparse
import base64
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt")


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, root, token, faults, log):
        self.root, self.token, self.log_path = root, token, log
        self.faults = faults  # {(kind, file): [n, remaining_uses]}
        self.lock = threading.Lock()
        self.lfs_store = {}  # sha256 -> bytes uploaded, not yet committed
        self.listing = {}  # repo -> (files, commit), dropped when a commit changes it
        self.lfs_objects = {}  # sha256 -> (bytes, path in its repo)

    def repos(self):
        out = []
        for org in sorted(os.listdir(self.root)):
            for name in sorted(os.listdir(os.path.join(self.root, org))):
                out.append(f"{org}/{name}")
        return out

    def files(self, repo):
        with self.lock:
            if repo not in self.listing:
                files = self.read_files(repo)
                h = hashlib.sha1()
                for path, data in files.items():
                    h.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
                self.listing[repo] = (files, h.hexdigest())
                for path, data in files.items():
                    if path.endswith(LFS_SUFFIXES):
                        self.lfs_objects[hashlib.sha256(data).hexdigest()] = (data, path)
            return self.listing[repo][0]

    def commit(self, repo):
        self.files(repo)
        return self.listing[repo][1]

    def forget(self, repo):
        with self.lock:
            self.listing.pop(repo, None)

    def read_files(self, repo):
        base = os.path.join(self.root, repo)
        out = {}
        for d, _, names in os.walk(base):
            for n in names:
                full = os.path.join(d, n)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                with open(full, "rb") as f:
                    data = f.read()
                out[rel] = data
        return dict(sorted(out.items()))

    def record(self, entry):
        if self.log_path:
            with self.lock, open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def take_fault(self, kind, file):
        with self.lock:
            f = self.faults.get((kind, file))
            if f is None or f[1] == 0:
                return None
            f[1] -= 1
            return f[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    @property
    def hub(self):
        return self.server.hub

    def send(self, code, body=b"", headers=(), content_type="application/json"):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if content_type and body is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, code, error_code, message):
        self.send(code, json.dumps({"error": message}).encode(), [("X-Error-Code", error_code), ("X-Error-Message", message)])

    def authorised(self):
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def split(self):
        url = urlsplit(self.path)
        return unquote(url.path), parse_qs(url.query)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path, _ = self.split()
        self.hub.record({"method": self.command, "path": path, "range": self.headers.get("Range"),
                         "auth": self.headers.get("Authorization") is not None})
        if path.startswith("/_lfs/"):
            return self.serve_lfs(path[len("/_lfs/"):])
        if not self.authorised():
            return self.error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, rev = "/".join(parts[2:4]), parts[5]
            commit = self.check_repo(repo, rev)
            if commit is None:
                return
            files = self.hub.files(repo)
            if parts[4] == "revision":
                info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                        "siblings": [{"rfilename": p} for p in files]}
                return self.send(200, json.dumps(info).encode())
            prefix = "/".join(parts[6:])
            entries = []
            for p, data in files.items():
                if prefix and not p.startswith(prefix + "/"):
                    continue
                e = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                if p.endswith(LFS_SUFFIXES):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self.send(200, json.dumps(entries).encode())
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            commit = self.check_repo(repo, rev)
            if commit is None:
                return
            files = self.hub.files(repo)
            if file not in files:
                return self.error(404, "EntryNotFound", f"{file} does not exist on revision {rev}")
            data = files[file]
            common = [("X-Repo-Commit", commit)]
            if file.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                # another host name for the same server: the Hub redirects to its CDN's host
                port = self.server.server_address[1]
                return self.send(302, b"", common + [
                    ("Location", f"http://localhost:{port}/_lfs/{sha}"), ("ETag", f'"{git_blob_sha1(data)}"'),
                    ("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(len(data)))], content_type=None)
            return self.send(200, data, common + [("ETag", f'"{git_blob_sha1(data)}"')], "application/octet-stream")
        self.error(404, "RepoNotFound", f"no route {path}")

    def check_repo(self, repo, rev):
        if repo not in self.hub.repos():
            self.error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        commit = self.hub.commit(repo)
        if rev not in ("main", commit):
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return commit

    def serve_lfs(self, sha):
        for repo in self.hub.repos():
            self.hub.files(repo)
        blob, name = self.hub.lfs_objects.get(sha, (None, None))
        if blob is None:
            return self.error(404, "EntryNotFound", f"no LFS object {sha}")
        delay = self.hub.take_fault("slow", name) if self.command == "GET" else None
        if delay:
            with self.hub.lock:
                self.hub.faults[("slow", name)][1] += 1  # every request, not only the first
            time.sleep(delay / 1000)
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        data = blob[start:]
        if self.command == "GET":
            if self.hub.take_fault("corrupt", name):
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
        headers = [("ETag", f'"{sha}"'), ("Accept-Ranges", "bytes")]
        code = 200
        if start:
            code = 206
            headers.append(("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}"))
        cut = self.hub.take_fault("cut", name) if self.command == "GET" else None
        if cut is not None:
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send(code, data, headers, "application/octet-stream")

    def do_PUT(self):
        path, _ = self.split()
        self.hub.record({"method": "PUT", "path": path, "range": None, "auth": False})
        if not path.startswith("/_lfs_upload/"):
            return self.error(404, "EntryNotFound", path)
        oid, data = path[len("/_lfs_upload/"):], self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "BadRequest", "sha256 does not match the oid")
        with self.hub.lock:
            self.hub.lfs_store[oid] = data
        self.send(200, b"")

    def do_POST(self):
        path, _ = self.split()
        body = self.body()
        self.hub.record({"method": "POST", "path": path, "range": None, "auth": self.headers.get("Authorization") is not None})
        if not self.authorised():
            return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
        parts = path.strip("/").split("/")
        if path == "/api/validate-yaml":  # huggingface_hub checks a README.md's header before uploading it
            return self.send(200, b"{}")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo in self.hub.repos():
                return self.error(409, "Conflict", "You already created this model repo")
            os.makedirs(os.path.join(self.hub.root, repo))
            self.hub.forget(repo)
            return self.send(200, json.dumps({"url": f"http://{self.headers.get('Host')}/{repo}"}).encode())
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "preupload":
            req = json.loads(body)
            out = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False} for f in req["files"]]
            return self.send(200, json.dumps({"files": out, "commitOid": None}).encode())
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            req = json.loads(body)
            host = self.headers.get("Host")
            objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"http://{host}/_lfs_upload/{o['oid']}"}}} for o in req["objects"]]
            return self.send(200, json.dumps({"transfer": "basic", "objects": objs}).encode(),
                             content_type="application/vnd.git-lfs+json")
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "commit":
            repo = "/".join(parts[2:4])
            if repo not in self.hub.repos():
                return self.error(404, "RepoNotFound", f"Repository Not Found: {repo}")
            writes = {}
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                op = json.loads(line)
                v = op["value"]
                if op["key"] == "file":
                    writes[v["path"]] = base64.b64decode(v["content"])
                elif op["key"] == "lfsFile":
                    with self.hub.lock:
                        data = self.hub.lfs_store.get(v["oid"])
                    if data is None or len(data) != v["size"]:
                        return self.error(400, "BadRequest", f"LFS object {v['oid']} of {v['path']} was not uploaded")
                    writes[v["path"]] = data
            for p, data in writes.items():
                full = os.path.join(self.hub.root, repo, p)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "wb") as f:
                    f.write(data)
            self.hub.forget(repo)
            commit = self.hub.commit(repo)
            return self.send(200, json.dumps({"commitOid": commit, "commitUrl": f"http://{self.headers.get('Host')}/{repo}/commit/{commit}"}).encode())
        self.error(404, "RepoNotFound", f"no route {path}")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client closing its keep-alive connection (or one cut by a fault) is not an error here
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--log")
    ap.add_argument("--token")
    ap.add_argument("--fault", action="append", default=[])
    a = ap.parse_args()
    faults = {}
    for spec in a.fault:
        kind, file, n = spec.split(":")
        faults[(kind, file)] = [int(n), 1 if kind != "corrupt" else int(n)]
    server = Server(("127.0.0.1", 0), Handler)
    server.hub = Hub(a.root, a.token, faults, a.log)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, a.port_file)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
