"""Fetch a file over the network and keep it only if its MD5 digest is the one on record."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_info

_CHUNK = 1 << 20


def md5sum(path: str | Path) -> str:
    """The hexadecimal MD5 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, destination: str | Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` and check it against ``md5`` before it is kept.

    The bytes go to a temporary file beside ``destination`` while their digest is computed; only a
    file whose digest matches is renamed into place, so an interrupted, truncated or corrupt
    download never leaves a file that looks complete. Any URL ``urllib`` opens works, ``file://``
    included (a local mirror).

    Raises:
        OSError: the URL could not be read (no network, wrong address).
        ValueError: the downloaded bytes have a different MD5 (the file is not kept).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    rank_zero_info(f"Downloading {url} to {destination}")
    digest = hashlib.md5(usedforsecurity=False)
    handle, partial = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as output:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        output.write(chunk)
            except (urllib.error.URLError, OSError) as error:
                raise OSError(
                    f"Could not download {url}: {error}. Check the network connection, or download the file "
                    f"by hand and place it at {destination}."
                ) from error
        if digest.hexdigest() != md5:
            raise ValueError(
                f"The file downloaded from {url} has MD5 {digest.hexdigest()}, but {md5} was expected: it is "
                f"truncated or corrupt, and was not saved to {destination}. Retry the download, or fetch the "
                "file by hand and check its MD5."
            )
        os.replace(partial, destination)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return destination
