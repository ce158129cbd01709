"""`fgvr data download`: fetch a benchmark's official files, verify them, extract them.

Every file goes to `<name>.part` first and becomes `<name>` only once its checksum matches, so
a file under its real name is always a verified one. An interrupted transfer resumes from the
`.part` (HTTP Range) on the next attempt or the next run; a transfer cut short, a file that
fails its checksum or a corrupt file left by an earlier run is fetched again, never extracted.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from fgvr.data.catalog import Archive, Benchmark
from fgvr.runtime.errors import DataError

CHUNK = 1 << 20


class _Incomplete(Exception):
    """The server closed the connection before the whole file arrived."""


def file_checksum(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path, checksums: tuple[str, ...]) -> bool:
    """Whether the file matches one of the checksums ("md5:<hex>", "sha256:<hex>")."""
    digests: dict[str, str] = {}
    for checksum in checksums:
        algorithm, expected = checksum.split(":", 1)
        if algorithm not in digests:
            digests[algorithm] = file_checksum(path, algorithm)
        if digests[algorithm] == expected.lower():
            return True
    return False


def _transfer(url: str, part: Path, timeout: float, report: Callable[[int, int | None], None]) -> None:
    """Fetch `url` into `part`, continuing from what `part` already holds when the server allows."""
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-", "User-Agent": "fgvr"} if start
                                     else {"User-Agent": "fgvr"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part is already complete (or longer than the file): start over
            part.unlink()
            raise _Incomplete("the partial file did not fit the server's file; starting over") from None
        raise
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored the Range header and sends the whole file
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        with part.open("ab" if start else "wb") as f:
            while block := response.read(CHUNK):
                f.write(block)
                received += len(block)
                report(received, total)
    if total is not None and received < total:
        raise _Incomplete(f"the connection closed after {received} of {total} bytes")


def fetch(archive: Archive, dest: Path, retries: int = 3, wait: float = 2.0, timeout: float = 60,
          progress: bool = False) -> str:
    """Make `dest` a verified copy of the archive; returns what was done ("present" or "downloaded")."""
    if dest.is_file():
        if verified(dest, archive.checksums):
            return "present"
        if archive.url is None:  # put there by hand: say so, and leave it
            raise DataError(f"{dest}: checksum mismatch: not the original file (corrupt, partial or another "
                            "version); replace it")
        print(f"{dest}: checksum mismatch (a corrupt or partial file); fetching it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problem = ""
    with _Progress(dest.name, archive.size, enabled=progress) as report:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(wait * 2 ** (attempt - 1))
            try:
                _transfer(archive.url, part, timeout, report)
            except urllib.error.HTTPError as e:
                raise DataError(f"{archive.url}: HTTP {e.code} {e.reason}; the file may have moved: fetch it by hand "
                                f"into {dest} and rerun") from None
            except (_Incomplete, OSError, http.client.HTTPException) as e:
                problem = str(e) or type(e).__name__
                continue  # resumes from the .part
            if verified(part, archive.checksums):
                part.replace(dest)
                return "downloaded"
            problem = f"checksum mismatch (expected {' or '.join(archive.checksums)})"
            part.unlink()  # a wrong file is never resumed from
    raise DataError(f"{archive.url}: download failed after {retries + 1} attempts: {problem}; rerun to try again "
                    f"(a partial file resumes) or fetch it by hand into {dest}")


def is_archive(path: Path) -> bool:
    return path.name.endswith((".tar", ".tgz", ".tar.gz", ".zip"))


def extract(path: Path, into: Path) -> None:
    """Unpack a tar or zip archive into `into`."""
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                z.extractall(into)
        else:
            with tarfile.open(path) as tar:
                tar.extractall(into, filter="data")  # no absolute paths, no escapes from `into`
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:  # OSError: a full disk, too
        raise DataError(f"{path}: cannot extract ({e}); delete it and rerun to fetch it again") from None


class _Progress:
    """A rich progress bar on a terminal; silence elsewhere."""

    def __init__(self, name: str, size: int | None, enabled: bool):
        self.name, self.size, self.enabled = name, size, enabled and sys.stderr.isatty()

    def __enter__(self) -> Callable[[int, int | None], None]:
        if not self.enabled:
            return lambda received, total: None
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        self.bar = Progress(*Progress.get_default_columns()[:3], DownloadColumn(), TransferSpeedColumn(),
                            transient=True)
        self.bar.start()
        task = self.bar.add_task(self.name, total=self.size)
        return lambda received, total: self.bar.update(task, completed=received, total=total or self.size)

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            self.bar.stop()
        return False


def download(bench: Benchmark, root: Path, ready: Callable[[Path], bool], remove_archives: bool = False,
             retries: int = 3, wait: float = 2.0, progress: bool = False) -> Path:
    """Fetch, verify and extract every file of `bench` under `root`; returns its data.root.

    `ready(data_root)` says whether the data set is already complete there: then nothing is
    fetched. Files that cannot be fetched automatically must have been put under `root` by hand
    (bench.manual says how); they are verified and extracted like the others."""
    data_root = root / bench.folder
    if ready(data_root):
        print(f"{bench.title} is already complete in {data_root}")
        return data_root
    missing = [a for a in bench.archives if a.url is None and not (root / a.into / a.name).is_file()]
    if missing:
        where = ", ".join(str(root / a.into / a.name) for a in missing)
        raise DataError(f"{bench.title} needs a manual step: {bench.manual} Put {where} there and rerun "
                        f"fgvr data download {bench.name} --root {root}")
    for archive in bench.archives:
        dest = root / archive.into / archive.name
        done = fetch(archive, dest, retries=retries, wait=wait, progress=progress)
        print(f"{dest}: {done}, checksum ok")
        if is_archive(dest):
            print(f"extracting {dest.name} into {dest.parent}")
            extract(dest, dest.parent)
    if not ready(data_root):
        raise DataError(f"{data_root}: the extracted files do not form a complete {bench.title}; "
                        f"fgvr data check {bench.name} --root {data_root} says what is wrong")
    if remove_archives:
        for archive in bench.archives:
            dest = root / archive.into / archive.name
            if is_archive(dest):
                dest.unlink()
    return data_root
