"""detector.data.download against a local HTTP server: resume after a broken transfer, integrity checks, unpacking,
the dataset-level download and its command line. Nothing here touches the internet."""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from detector.cli.download import main
from detector.data.dataset_config import load_dataset_config
from detector.data.download import archive_name, check_archive, download_file, extract_archive
from detector.errors import DataError


@dataclass
class FileServer:
    """Files served from memory on 127.0.0.1, with Range support and injectable faults."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    break_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping, once
    ignore_range: bool = False
    base_url: str = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _handler(server_state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/").split("?")[0]
            range_header = self.headers.get("Range")
            server_state.requests.append((name, range_header))
            if name not in server_state.files:
                self.send_error(404, "Not Found")
                return
            body = server_state.files[name]
            start = 0
            if range_header and not server_state.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = server_state.break_after.pop(name, None)
            self.wfile.write(body[start:] if cut is None else body[start:cut])
            self.close_connection = True  # with a cut: the client sees the connection close early

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


PAYLOAD = bytes(range(256)) * 400  # 100 KB, so a transfer can be cut in the middle


# --------------------------------------------------------------------------------------------------------------------
# Transfers


def test_download_whole_file(server: FileServer, tmp_path: Path) -> None:
    server.files["a.zip"] = PAYLOAD
    out = download_file(server.url("a.zip"), tmp_path / "a.zip", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.zip.part").exists()
    assert server.requests == [("a.zip", None)]


def test_broken_transfer_resumes_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    server.files["a.zip"] = PAYLOAD
    server.break_after["a.zip"] = 30_000
    out = download_file(server.url("a.zip"), tmp_path / "a.zip", retry_delay=0, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.requests == [("a.zip", None), ("a.zip", "bytes=30000-")]


def test_interrupted_part_file_is_resumed_by_a_later_call(server: FileServer, tmp_path: Path) -> None:
    server.files["a.zip"] = PAYLOAD
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:12_345])  # left by an earlier, killed run
    download_file(server.url("a.zip"), tmp_path / "a.zip", progress=False)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert server.requests == [("a.zip", "bytes=12345-")]


def test_server_without_range_support_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    server.files["a.zip"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "a.zip.part").write_bytes(b"stale bytes that must not be kept")
    download_file(server.url("a.zip"), tmp_path / "a.zip", progress=False)
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD


def test_repeated_breaks_give_up_after_the_retries(server: FileServer, tmp_path: Path) -> None:
    server.files["a.zip"] = PAYLOAD
    server.ignore_range = True  # every attempt starts over and is cut again

    class AlwaysCut(dict):
        def pop(self, key: str, default: object = None) -> int:
            return 1000

    server.break_after = AlwaysCut()
    with pytest.raises(DataError, match=r"a\.zip: download failed after 2 attempts: connection closed after 1000 of"):
        download_file(server.url("a.zip"), tmp_path / "a.zip", retries=2, retry_delay=0, progress=False)
    assert not (tmp_path / "a.zip").exists()


def test_missing_file_fails_at_once_with_the_status(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.zip: server answered HTTP 404"):
        download_file(server.url("nope.zip"), tmp_path / "nope.zip", retry_delay=0, progress=False)
    assert len(server.requests) == 1


def test_archive_name_from_url() -> None:
    assert archive_name("https://x.org/a/b/coco128.zip?dl=1") == "coco128.zip"
    assert archive_name("http://x.org/VOC%202007.tar") == "VOC 2007.tar"
    with pytest.raises(DataError, match=r"expected a URL ending in"):
        archive_name("http://x.org/readme.txt")


# --------------------------------------------------------------------------------------------------------------------
# Archives


def test_extract_zip_and_tar_gz(tmp_path: Path) -> None:
    (tmp_path / "z.zip").write_bytes(make_zip({"ds/images/a.jpg": b"img", "ds/labels/a.txt": b"0 0.5 0.5 1 1\n"}))
    assert extract_archive(tmp_path / "z.zip", tmp_path / "out") == ["ds"]
    assert (tmp_path / "out" / "ds" / "labels" / "a.txt").read_text() == "0 0.5 0.5 1 1\n"
    (tmp_path / "t.tar.gz").write_bytes(make_tar_gz({"ds/images/b.jpg": b"img2"}))
    assert extract_archive(tmp_path / "t.tar.gz", tmp_path / "out") == ["ds"]
    # The second archive merges into the existing folder instead of replacing it.
    assert (tmp_path / "out" / "ds" / "images" / "b.jpg").read_bytes() == b"img2"
    assert (tmp_path / "out" / "ds" / "images" / "a.jpg").read_bytes() == b"img"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]  # no staging folder left behind


def test_corrupt_zip_is_refused_and_deleted(tmp_path: Path) -> None:
    data = bytearray(make_zip({"ds/a.bin": bytes(range(256)) * 200}, compression=zipfile.ZIP_STORED))
    data[len(data) // 2] ^= 0xFF  # flip one byte of the stored member: its CRC no longer matches
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.zip: corrupt archive \(member 'ds/a\.bin' fails its CRC check\)"):
        extract_archive(archive, tmp_path / "out")
    assert not archive.exists()
    assert not (tmp_path / "out" / "ds").exists()


def test_truncated_tar_gz_is_refused(tmp_path: Path) -> None:
    data = make_tar_gz({"ds/a.bin": bytes(range(256)) * 400})
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz: corrupt or truncated archive"):
        check_archive(archive)
    assert not archive.exists()


def test_unsafe_member_paths_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"ds/ok.txt": b"1", "../escaped.txt": b"2"}))
    with pytest.raises(DataError, match=r"unsafe member '\.\./escaped\.txt'"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    symlink_tar = io.BytesIO()
    with tarfile.open(fileobj=symlink_tar, mode="w") as tf:
        link = tarfile.TarInfo("ds/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "link.tar").write_bytes(symlink_tar.getvalue())
    with pytest.raises(DataError, match=r"link\.tar: unsafe member"):
        extract_archive(tmp_path / "link.tar", tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# A dataset YAML with download:, end to end


def test_dataset_yaml_download_end_to_end(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["tiny.zip"] = make_zip(
        {"tiny/images/train/a.jpg": b"jpeg", "tiny/labels/train/a.txt": b"0 0.5 0.5 0.2 0.2\n"}
    )
    server.files["extra.tar.gz"] = make_tar_gz({"val/b.jpg": b"jpeg2"})
    server.break_after["tiny.zip"] = 100  # the first transfer breaks; the loader must resume and succeed
    yaml_path = tmp_path / "cfg" / "tiny.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(
        "path: ../sets/tiny\ntrain: images/train\nval: images/val\nnames: [thing]\n"
        f"download:\n  - {server.url('tiny.zip')}\n  - {{url: '{server.url('extra.tar.gz')}', dir: images}}\n"
    )
    import detector.data.download as download_module

    fetch = download_module.download_file
    monkeypatch.setattr(download_module, "download_file", lambda url, dest, **_: fetch(url, dest, retry_delay=0))
    config = load_dataset_config(yaml_path)
    root = (tmp_path / "sets" / "tiny").resolve()
    assert config.root == root
    assert (root / "labels" / "train" / "a.txt").read_text() == "0 0.5 0.5 0.2 0.2\n"
    assert (root / "images" / "val" / "b.jpg").read_bytes() == b"jpeg2"
    assert not list((tmp_path / "sets").glob("*.zip*")) and not list(root.glob("images/*.tar.gz*"))  # cleaned up
    assert [r[1] for r in server.requests if r[0] == "tiny.zip"] == [None, "bytes=100-"]
    # A second load finds everything in place and downloads nothing.
    before = len(server.requests)
    load_dataset_config(yaml_path)
    assert len(server.requests) == before


def test_cli_reports_a_dataset_without_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = tmp_path / "d.yaml"
    yaml_path.write_text("train: a\nval: b\nnames: [x]\n")
    assert main([str(yaml_path)]) == 2
    assert "no 'download' URLs to fetch" in capsys.readouterr().err
