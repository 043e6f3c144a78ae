"""The canonical data archives: where to get them, how to verify them, how to read them.

Every archive is located in a folder the user names (``--archives DIR``, for machines
without internet), or else in the recipe's download folder, or else downloaded there.
A download is written to ``NAME.part`` and renamed only after it verified. Verifying
reads the whole archive (gzip and zip check their CRCs at the end, so a truncated or
corrupt file fails), checks that the members the recipe needs are there, and compares
the SHA-256 with an expected value where one is given (``--sha256 NAME=HEX``). The
SHA-256 of every archive used is written to the prepared data's ``manifest.json``.
"""
import dataclasses
import hashlib
import logging
import lzma
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ArchiveError(RuntimeError):
    """An archive is missing, incomplete, corrupt or not the expected file."""


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One archive of a data set.

    ``members`` are paths inside the archive that the recipe reads; a member is found by
    its path with any leading ``./`` removed. ``sha256`` is the expected checksum when
    known (the recipes record the checksum they saw instead of pinning one they never
    downloaded).
    """

    filename: str
    urls: Tuple[str, ...]
    members: Tuple[str, ...]
    sha256: Optional[str] = None


def sha256sum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalize(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return posixpath.normpath(name)


def _is_zip(path: str) -> bool:
    return path.lower().endswith(".zip")


def list_members(path: str) -> List[str]:
    """Read the whole archive at ``path`` and return its regular files' names.

    Raises :class:`ArchiveError` when the file is truncated or corrupt.
    """
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ArchiveError(f"{path}: member {bad} fails its CRC check")
                return [_normalize(i.filename) for i in zf.infolist() if not i.is_dir()]
        names = []
        with tarfile.open(path, "r:*") as tf:
            for info in tf:
                if info.isfile():
                    src = tf.extractfile(info)
                    while src.read(_CHUNK):
                        pass
                    names.append(_normalize(info.name))
            # read the compressed stream to its end, where gzip, bz2 and xz keep the checksum
            # of everything decompressed (the members end before it)
            while tf.fileobj.read(_CHUNK):
                pass
        return names
    except ArchiveError:
        raise
    # (zlib.error: a damaged deflate stream inside an intact gzip or zip container)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
            OSError, ValueError) as exc:
        raise ArchiveError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def verify(path: str, spec: ArchiveSpec, expected_sha256: Optional[str] = None) -> str:
    """Check that ``path`` is a complete archive holding ``spec.members`` (and has the
    expected SHA-256, if one is known). Returns the file's SHA-256."""
    if not os.path.isfile(path):
        raise ArchiveError(f"{path} does not exist")
    if os.path.getsize(path) == 0:
        raise ArchiveError(f"{path} is empty")
    digest = sha256sum(path)
    expected = (expected_sha256 or spec.sha256 or "").lower()
    if expected and digest != expected:
        raise ArchiveError(
            f"{path} has SHA-256 {digest}, expected {expected}: it is not the canonical "
            f"{spec.filename} (or it is damaged)"
        )
    present = set(list_members(path))
    missing = [m for m in spec.members if _normalize(m) not in present]
    if missing:
        raise ArchiveError(
            f"{path} lacks {', '.join(missing)}: it is not the canonical {spec.filename}"
        )
    logger.info("verified %s (%d bytes, sha256 %s)", path, os.path.getsize(path), digest)
    return digest


def download(spec: ArchiveSpec, dest: str, timeout: float = 60.0) -> None:
    """Download ``spec`` to ``dest`` through ``dest + ".part"``, trying each URL in turn."""
    part = dest + ".part"
    errors = []
    for url in spec.urls:
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, out, _CHUNK)
            got = os.path.getsize(part)
            if expected is not None and got != int(expected):
                raise ArchiveError(f"got {got} of {expected} bytes")
        except (urllib.error.URLError, OSError, ArchiveError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            if os.path.exists(part):
                os.remove(part)
            continue
        os.replace(part, dest)
        return
    raise ArchiveError(
        f"could not download {spec.filename}:\n  " + "\n  ".join(errors)
        + f"\nDownload it by other means and pass the folder that holds it with --archives"
    )


def fetch(
    spec: ArchiveSpec,
    download_dir: str,
    archive_dir: Optional[str] = None,
    expected_sha256: Optional[str] = None,
) -> Tuple[str, str]:
    """Locate (or download) and verify ``spec``; returns ``(path, sha256)``.

    With ``archive_dir`` the archive must be there (nothing is downloaded). Otherwise a
    verified copy in ``download_dir`` is reused, or the archive is downloaded into it; a
    download that fails verification is deleted.
    """
    if archive_dir is not None:
        path = os.path.join(archive_dir, spec.filename)
        if not os.path.isfile(path):
            raise ArchiveError(
                f"--archives {archive_dir} holds no {spec.filename}; download it from "
                + " or ".join(spec.urls)
            )
        return path, _verified(path, spec, expected_sha256,
                               "replace it with a good copy from " + " or ".join(spec.urls))
    os.makedirs(download_dir, exist_ok=True)
    path = os.path.join(download_dir, spec.filename)
    if not os.path.isfile(path):
        download(spec, path)
        try:
            return path, _verified(path, spec, expected_sha256, "the download was deleted")
        except ArchiveError:
            os.remove(path)
            raise
    return path, _verified(path, spec, expected_sha256,
                           "delete it, and the next run downloads it again")


def _verified(path: str, spec: ArchiveSpec, expected_sha256: Optional[str], remedy: str) -> str:
    """:func:`verify`, its error ending with what to do about the file."""
    try:
        return verify(path, spec, expected_sha256)
    except ArchiveError as exc:
        raise ArchiveError(f"{exc}; {remedy}") from exc


def extract(path: str, members: Mapping[str, str]) -> None:
    """Write the archive members named by the keys of ``members`` to the file paths that
    are their values. Member names come from the recipe, never from the archive, so no
    archive entry can write outside the given paths."""
    wanted = {_normalize(m): dest for m, dest in members.items()}
    found = set()
    if _is_zip(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                dest = wanted.get(_normalize(info.filename))
                if dest is not None and not info.is_dir():
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    found.add(_normalize(info.filename))
    else:
        with tarfile.open(path, "r:*") as tf:
            for info in tf:
                dest = wanted.get(_normalize(info.name))
                if dest is not None and info.isfile():
                    with tf.extractfile(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    found.add(_normalize(info.name))
    missing = sorted(set(wanted) - found)
    if missing:
        raise ArchiveError(f"{path} lacks {', '.join(missing)}")


def parse_sha256_flags(values: Iterable[str]) -> Dict[str, str]:
    """``["de-en.tgz=abc..."]`` -> ``{"de-en.tgz": "abc..."}`` (for ``--sha256``)."""
    out = {}
    for value in values:
        name, sep, digest = value.partition("=")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"--sha256 {value!r}: expected ARCHIVE_NAME=<64 hex digits>")
        out[name] = digest
    return out


def check_sha256_names(specs: Sequence[ArchiveSpec], expected: Mapping[str, str]) -> None:
    """Raise unless every archive that ``--sha256`` names is one of ``specs``."""
    unknown = set(expected) - {s.filename for s in specs}
    if unknown:
        raise ValueError(
            f"--sha256 names {', '.join(sorted(unknown))}, which this recipe does not use "
            f"(it uses {', '.join(s.filename for s in specs)})"
        )


def fetch_all(
    specs: Sequence[ArchiveSpec],
    download_dir: str,
    archive_dir: Optional[str],
    expected: Mapping[str, str],
) -> Dict[str, Dict[str, object]]:
    """Fetch and verify every archive; returns ``{filename: {"path", "sha256", "bytes"}}``."""
    check_sha256_names(specs, expected)
    out, errors = {}, []
    for spec in specs:  # every archive, so that one run reports every problem
        try:
            path, digest = fetch(spec, download_dir, archive_dir, expected.get(spec.filename))
        except ArchiveError as exc:
            errors.append(str(exc))
            continue
        out[spec.filename] = {"path": os.path.abspath(path), "sha256": digest,
                              "bytes": os.path.getsize(path)}
    if errors:
        raise ArchiveError("\n".join(errors))
    return out
