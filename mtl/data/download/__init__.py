"""Getting raw dataset files onto disk, whole and verified, or failing with a message that says why.

Small verbs in the spirit of torchvision's ``datasets/utils.py`` (digest, check, verify, download,
extract), plus what it lacks and what users trip over most: a ``<name>.part`` temp file renamed
only once the file verifies, resume through HTTP Range, mirrors tried in order, rejection of HTML
pages saved under a data file's name (Google Drive's virus-scan and quota pages), Google Drive's
confirm step, sizes and MD5s read from a Zenodo record's listing, and archive extraction that
refuses members escaping the target folder.

One module per concern, each importing only those listed before it:

- :mod:`~mtl.data.download.integrity`: size, MD5 and SHA-256 checks, the ``<name>.sha256`` record;
- :mod:`~mtl.data.download.archives`: safe extraction of tar and zip archives;
- :mod:`~mtl.data.download.http`: one file from one mirror (resume, retries, HTML, Google Drive);
- :mod:`~mtl.data.download.zenodo`: the size and MD5 a Zenodo record lists for a file;
- :mod:`~mtl.data.download.fetch`: a file from its mirrors, and every raw file of a dataset.

This package re-exports the names the rest of the code base uses.
"""

from mtl.data.download.archives import safe_extract
from mtl.data.download.fetch import download_file, fetch_dataset
from mtl.data.download.integrity import (
    check_integrity,
    file_digest,
    read_sha256_record,
    verify_file,
)

__all__ = [
    "check_integrity",
    "download_file",
    "fetch_dataset",
    "file_digest",
    "read_sha256_record",
    "safe_extract",
    "verify_file",
]
