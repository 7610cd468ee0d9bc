"""An S3-compatible server for spike's tests: moto's S3 (pinned in scripts/s3.sh), with two
additions that spike's store contract needs and `moto_server` lacks.

- Requests are handled one at a time (one lock around the application). moto checks
  `If-Match` / `If-None-Match` on PutObject and then writes, as two steps; with moto's
  threaded server two conditional writes could both pass the check. Serialised, the check and
  the write are atomic, as on AWS S3 or MinIO.
- Objects are persisted under --data after every successful write and loaded again at start, so
  a test can stop the server and start it again on the same directory without losing
  acknowledged writes (moto keeps everything in memory).

Test use only: the persistence is a plain file per object, without fsync.

--ignore-conditional-writes makes it a server that spike must refuse: the If-Match and
If-None-Match headers of every request are dropped before moto sees them, as an S3 server that
does not implement conditional writes would, so every PutObject overwrites.
"""

import argparse
import os
import threading
import urllib.parse

from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.s3.models import s3_backends
from werkzeug.serving import run_simple


def backend():
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


class Persisted:
    """Mirrors moto's buckets into DIR/<bucket>/<quoted key>."""

    def __init__(self, root):
        self.root = root
        self.etags = {}  # (bucket, key) -> etag written to disk

    def load(self, region):
        os.makedirs(self.root, exist_ok=True)
        b = backend()
        for bucket in sorted(os.listdir(self.root)):
            if bucket not in b.buckets:
                b.create_bucket(bucket, region)
            bdir = os.path.join(self.root, bucket)
            for name in os.listdir(bdir):
                if name.endswith(".tmp"):
                    continue
                key = urllib.parse.unquote(name)
                with open(os.path.join(bdir, name), "rb") as f:
                    k = b.put_object(bucket, key, f.read())
                self.etags[(bucket, key)] = k.etag

    def sync(self):
        b = backend()
        seen = set()
        for bucket_name, bucket in list(b.buckets.items()):
            bdir = os.path.join(self.root, bucket_name)
            os.makedirs(bdir, exist_ok=True)
            for key in list(bucket.keys.keys()):
                obj = bucket.keys[key]
                seen.add((bucket_name, key))
                if self.etags.get((bucket_name, key)) == obj.etag:
                    continue
                path = os.path.join(bdir, urllib.parse.quote(key, safe=""))
                with open(path + ".tmp", "wb") as f:
                    f.write(obj.value)
                os.replace(path + ".tmp", path)
                self.etags[(bucket_name, key)] = obj.etag
        for bucket_name, key in list(self.etags):
            if (bucket_name, key) not in seen:
                path = os.path.join(
                    self.root, bucket_name, urllib.parse.quote(key, safe="")
                )
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                del self.etags[(bucket_name, key)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--ignore-conditional-writes", action="store_true")
    args = p.parse_args()

    store = Persisted(args.data)
    store.load(args.region)
    if args.bucket not in backend().buckets:
        backend().create_bucket(args.bucket, args.region)
    store.sync()

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialised(environ, start_response):
        status = []

        def capture(s, headers, exc_info=None):
            status.append(s)
            return start_response(s, headers, exc_info)

        if args.ignore_conditional_writes:
            environ.pop("HTTP_IF_MATCH", None)
            environ.pop("HTTP_IF_NONE_MATCH", None)
        with lock:
            body = b"".join(app(environ, capture))
            if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE") and status:
                if status[0][:1] == "2":
                    store.sync()
        return [body]

    run_simple(
        args.host,
        args.port,
        serialised,
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
