"""Storage URIs: a local path, or scheme://bucket/prefix[?pyarrow options] (child URIs keep the query last)."""
from __future__ import annotations

from raywalk.records.errors import StorageError


def check_uri(uri: str) -> None:
    """A remote URI must name a bucket: scheme://BUCKET[/prefix][?options]."""
    base, _ = split_query(uri)
    scheme, _, rest = base.partition("://")
    if not scheme or not rest.split("/", 1)[0]:
        raise StorageError(f"storage URI {uri!r} is malformed: no bucket (expected {scheme or 's3'}://BUCKET/PREFIX)")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def split_query(uri: str) -> tuple[str, str]:
    """(base, query) of a remote URI; local paths never have a query ('?' may be in a file name)."""
    if not is_remote(uri):
        return uri, ""
    base, _, query = uri.partition("?")
    return base, query


def join_uri(uri: str, *parts: str) -> str:
    """uri/part/part, with a remote URI's query string kept at the end."""
    base, query = split_query(uri)
    out = "/".join([base.rstrip("/") if parts else base, *[p.strip("/") for p in parts if p]])
    return f"{out}?{query}" if query else out


def pyarrow_uri(uri: str) -> str:
    """The URI pyarrow opens: for s3, `allow_delayed_open=true` unless the user chose otherwise.

    With it, a small object (result.json, a manifest, a checkpoint) is one PutObject
    instead of a multipart upload: fewer requests, all-or-nothing, and accepted by
    S3-compatible servers whose CompleteMultipartUpload pyarrow rejects (moto 5.2).
    """
    base, query = split_query(uri)
    if not base.startswith("s3://") or "allow_delayed_open=" in query:
        return uri
    return f"{base}?{query + '&' if query else ''}allow_delayed_open=true"
