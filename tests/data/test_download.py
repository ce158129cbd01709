"""`fgvr data download` against a local HTTP server on 127.0.0.1: good files, wrong checksums,
transfers cut short, resumed partial files, manual steps and hostile archives."""

import dataclasses
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fgvr.data import catalog
from fgvr.data.catalog import Archive
from tests.data.miniatures import WRITERS
from tests.data.test_check import data


class Files:
    """What the server serves, how it misbehaves, and what it was asked for."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}  # path -> how many more responses to cut off halfway
        self.ranges = True  # whether Range requests are honoured
        self.requests: list[tuple[str, str | None]] = []


@pytest.fixture
def server():
    files = Files()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            files.requests.append((self.path, self.headers.get("Range")))
            body = files.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) \
                if files.ranges and self.headers.get("Range") else 0
            if start >= len(body) and start:
                self.send_error(416)
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            rest = body[start:]
            if files.cut.get(self.path, 0) > 0:
                files.cut[self.path] -= 1
                rest = rest[: len(rest) // 2]  # then the connection closes (HTTP/1.0)
            self.wfile.write(rest)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    files.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield files
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr("fgvr.data.download.time.sleep", lambda seconds: None)


def tgz(src: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname=arcname)
    return buf.getvalue()


def md5(body: bytes) -> str:
    return "md5:" + hashlib.md5(body).hexdigest()


@pytest.fixture
def cub_archive(tmp_path, server, monkeypatch):
    """The CUB miniature as CUB_200_2011.tgz on the server, and as the catalog's cub entry."""
    root, expected = WRITERS["cub"](tmp_path / "src" / "CUB_200_2011")
    body = tgz(root, "CUB_200_2011")
    server.files["/CUB_200_2011.tgz"] = body
    archive = Archive(f"{server.url}/CUB_200_2011.tgz", (md5(body),))
    bench = dataclasses.replace(catalog.BENCHMARKS["cub"], archives=(archive,), classes=3, train=12, test=6)
    monkeypatch.setitem(catalog.BENCHMARKS, "cub", bench)
    return body


def test_download_verifies_extracts_and_checks(tmp_path, server, cub_archive, capsys):
    dest = tmp_path / "data"
    assert data("download", "cub", "--root", dest) == 0
    out = capsys.readouterr().out
    assert f"{dest / 'CUB_200_2011.tgz'}: downloaded, checksum ok" in out
    assert out.strip().endswith(f"ready: fgvr train data=cub data.root={dest / 'CUB_200_2011'}")
    assert (dest / "CUB_200_2011" / "images.txt").is_file() and not (dest / "CUB_200_2011.tgz.part").exists()
    requests = len(server.requests)
    assert data("download", "cub", "--root", dest) == 0  # already complete: nothing fetched
    assert "already complete" in capsys.readouterr().out and len(server.requests) == requests
    assert data("check", "cub", "--root", dest / "CUB_200_2011", "--workers", 1) == 0


def test_a_wrong_checksum_is_never_kept_or_extracted(tmp_path, server, cub_archive, capsys):
    server.files["/CUB_200_2011.tgz"] = cub_archive[:-10] + b"0123456789"  # same size, other bytes
    dest = tmp_path / "data"
    assert data("download", "cub", "--root", dest) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "download failed after 4 attempts: checksum mismatch (expected md5:" in err[0]
    assert [p.name for p in dest.iterdir()] == []  # no archive, no .part, nothing extracted
    assert all(r is None for _, r in server.requests)  # a wrong file is fetched again whole, never resumed


def test_a_transfer_cut_short_resumes_where_it_stopped(tmp_path, server, cub_archive, capsys):
    server.cut["/CUB_200_2011.tgz"] = 2
    dest = tmp_path / "data"
    assert data("download", "cub", "--root", dest) == 0
    half = len(cub_archive) // 2
    assert server.requests == [("/CUB_200_2011.tgz", None), ("/CUB_200_2011.tgz", f"bytes={half}-"),
                               ("/CUB_200_2011.tgz", f"bytes={half + (len(cub_archive) - half) // 2}-")]
    assert (dest / "CUB_200_2011.tgz").read_bytes() == cub_archive


def test_a_server_without_ranges_sends_the_whole_file_again(tmp_path, server, cub_archive):
    server.cut["/CUB_200_2011.tgz"], server.ranges = 1, False
    dest = tmp_path / "data"
    assert data("download", "cub", "--root", dest) == 0
    assert len(server.requests) == 2 and (dest / "CUB_200_2011.tgz").read_bytes() == cub_archive


def test_an_interrupted_download_from_an_earlier_run_resumes(tmp_path, server, cub_archive):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "CUB_200_2011.tgz.part").write_bytes(cub_archive[:1000])
    assert data("download", "cub", "--root", dest) == 0
    assert server.requests == [("/CUB_200_2011.tgz", "bytes=1000-")]


def test_a_corrupt_archive_left_behind_is_fetched_again(tmp_path, server, cub_archive, capsys):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "CUB_200_2011.tgz").write_bytes(cub_archive[:5000])  # partial, under the real name
    assert data("download", "cub", "--root", dest) == 0
    assert "CUB_200_2011.tgz: checksum mismatch (a corrupt or partial file); fetching it again" in \
        capsys.readouterr().err
    assert (dest / "CUB_200_2011.tgz").read_bytes() == cub_archive


def test_a_missing_file_on_the_server(tmp_path, server, cub_archive, capsys):
    del server.files["/CUB_200_2011.tgz"]
    assert data("download", "cub", "--root", tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert "CUB_200_2011.tgz: HTTP 404" in err and "fetch it by hand into" in err


def test_several_files_into_one_folder_and_remove_archives(tmp_path, server, monkeypatch, capsys):
    """Flowers: an image archive and two .mat files that are used as they come."""
    root, expected = WRITERS["flowers"](tmp_path / "src" / "flowers102")
    archives = []
    for name, body in (("102flowers.tgz", tgz(root / "jpg", "jpg")),
                       ("imagelabels.mat", (root / "imagelabels.mat").read_bytes()),
                       ("setid.mat", (root / "setid.mat").read_bytes())):
        server.files[f"/{name}"] = body
        archives.append(Archive(f"{server.url}/{name}", (md5(body),), into="flowers102"))
    bench = dataclasses.replace(catalog.BENCHMARKS["flowers"], archives=tuple(archives), classes=3, train=6, test=6)
    monkeypatch.setitem(catalog.BENCHMARKS, "flowers", bench)
    dest = tmp_path / "data"
    assert data("download", "flowers", "--root", dest, "--remove-archives") == 0
    assert sorted(p.name for p in (dest / "flowers102").iterdir()) == ["imagelabels.mat", "jpg", "setid.mat"]
    assert capsys.readouterr().out.strip().endswith(f"data.root={dest / 'flowers102'}")


def test_a_manual_step_is_explained_then_the_file_is_verified(tmp_path, monkeypatch, capsys):
    root, _ = WRITERS["nabirds"](tmp_path / "src" / "nabirds")
    body = tgz(root, "nabirds")
    archive = Archive(None, (md5(body),), filename="nabirds.tar.gz")
    bench = dataclasses.replace(catalog.BENCHMARKS["nabirds"], archives=(archive,), classes=3, train=9, test=6)
    monkeypatch.setitem(catalog.BENCHMARKS, "nabirds", bench)
    dest = tmp_path / "data"
    assert data("download", "nabirds", "--root", dest) == 1
    err = capsys.readouterr().err
    assert "NABirds needs a manual step: Cornell hands NABirds out only after you accept its terms" in err
    assert f"Put {dest / 'nabirds.tar.gz'} there and rerun" in err
    dest.mkdir()
    (dest / "nabirds.tar.gz").write_bytes(body[:-1])
    assert data("download", "nabirds", "--root", dest) == 1
    assert "checksum mismatch: not the original file" in capsys.readouterr().err
    assert (dest / "nabirds.tar.gz").is_file()  # the user's file is left alone
    (dest / "nabirds.tar.gz").write_bytes(body)
    assert data("download", "nabirds", "--root", dest) == 0
    assert (dest / "nabirds" / "hierarchy.txt").is_file()


def test_an_archive_reaching_outside_its_folder_is_refused(tmp_path, server, monkeypatch, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    body = buf.getvalue()
    server.files["/evil.tgz"] = body
    bench = dataclasses.replace(catalog.BENCHMARKS["cub"], archives=(Archive(f"{server.url}/evil.tgz", (md5(body),),
                                                                             into="x"),))
    monkeypatch.setitem(catalog.BENCHMARKS, "cub", bench)
    assert data("download", "cub", "--root", tmp_path / "data") == 1
    assert "evil.tgz: cannot extract" in capsys.readouterr().err
    assert not (tmp_path / "data" / "escaped.txt").exists()


def test_download_of_a_name_without_an_entry(tmp_path, capsys):
    assert data("download", "folder", "--root", tmp_path) == 2
    assert "folder: not a benchmark that can be downloaded; choose one of cub, nabirds" in capsys.readouterr().err
