"""A real S3-compatible server (moto, threaded, in this process) for the tests that need one.

The same shape as tests/test_remote_storage.py's fixture: fake credentials in the
environment only, the endpoint in the storage URI's query string.
"""
from __future__ import annotations

import os

import pytest

BUCKET = "raywalk-test"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    old = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"port": port, "client": client,
           "uri": lambda prefix, bucket=BUCKET: f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
