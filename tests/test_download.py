"""`fastspec download` against a local HTTP server on 127.0.0.1 that serves copies of the bundled files laid
out like the SDSS archive (Range support, one file whose first request drops the connection midway, a 404,
a server that ignores Range, an HTML error page). No remote host is ever contacted."""
from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from fastspec import cli
from fastspec.download import Target, fetch, read_targets, spec_url

SDSS_FILE = "spec-0266-51602-0013.fits"  # plate < 3510: redux/26 under sdss/
BOSS_FILE = "spec-4055-55359-0006.fits"  # plate ≥ 3510: redux/v5_13_0 under eboss/
BOSS_FILE2 = "spec-10000-57346-0009.fits"


def archive_path(name: str) -> str:
    plate, mjd, fiber = (int(x) for x in re.match(r"spec-(\d+)-(\d+)-(\d+)", name).groups())
    if plate >= 3510:
        return f"eboss/spectro/redux/v5_13_0/spectra/lite/{plate:04d}/{name}"
    return f"sdss/spectro/redux/26/spectra/lite/{plate:04d}/{name}"


class Archive:
    """A threaded http.server on an ephemeral port serving `root`, with per-path misbehaviour."""

    def __init__(self, root: Path):
        self.root = root
        self.requests = []  # (path, Range header or None)
        self.drop_once = set()  # paths whose first request ends after half the bytes
        self.no_range = set()  # paths served whole (200) whatever the Range header
        self.html = set()  # paths answered with an HTML page and status 200
        archive = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                archive.requests.append((path, rng))
                if path in archive.html:
                    body = b"<html><body>Service temporarily unavailable</body></html>" * 50
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                f = archive.root / path
                if not f.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = f.read_bytes()
                start = 0
                m = re.match(r"bytes=(\d+)-$", rng or "")
                if m and path not in archive.no_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if path in archive.drop_once:
                    archive.drop_once.discard(path)
                    self.wfile.write(data[start: start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the client sees EOF before Content-Length
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sas/dr16"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def archive(real_data_dir, tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 only, never through a proxy
    root = tmp_path / "server"
    for name in (SDSS_FILE, BOSS_FILE, BOSS_FILE2):
        dest = root / "sas" / "dr16" / archive_path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_data_dir / "sdss" / name, dest)
    with Archive(root) as a:
        a.src = {n: real_data_dir / "sdss" / n for n in (SDSS_FILE, BOSS_FILE, BOSS_FILE2)}
        yield a


def test_read_targets(tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text("# my galaxies\nplate,mjd,fiber\n266, 51602, 13\n4055 55359 6  # comment\n\n"
                   "spec-10000-57346-0009.fits\n266,51602,13\n")
    assert read_targets(lst) == [Target(266, 51602, 13), Target(4055, 55359, 6), Target(10000, 57346, 9)]
    bad = tmp_path / "bad.txt"
    bad.write_text("266 51602 13\n266 5160x 13\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: field mjd: '5160x' is not an integer"):
        read_targets(bad)
    bad.write_text("266 51602\n")
    with pytest.raises(ValueError, match=r"line 1: expected 3 fields"):
        read_targets(bad)


def test_dr16_urls():
    base = "https://data.sdss.org/sas/dr16"
    assert spec_url(Target(266, 51602, 13), base) == \
        f"{base}/sdss/spectro/redux/26/spectra/lite/0266/spec-0266-51602-0013.fits"
    assert spec_url(Target(10000, 57346, 9), base + "/") == \
        f"{base}/eboss/spectro/redux/v5_13_0/spectra/lite/10000/spec-10000-57346-0009.fits"
    assert spec_url(Target(3509, 1, 2), "X", "{base}/{run2d}/{plate}-{mjd}-{fiber}") == "X/26/3509-1-2"


def test_download_resume_404_and_skip(archive, tmp_path, capsys):
    out = tmp_path / "dl"
    # one already downloaded: skipped without a request
    (out / "0266").mkdir(parents=True)
    shutil.copy(archive.src[SDSS_FILE], out / "0266" / SDSS_FILE)
    archive.drop_once.add("sas/dr16/" + archive_path(BOSS_FILE))
    lst = tmp_path / "list.txt"
    lst.write_text("266 51602 13\n4055 55359 6\n10000 57346 9\n1234 52000 100  # not on the server\n")
    report = tmp_path / "report.json"
    rc = cli.main(["download", str(lst), "-d", str(out), "--base-url", archive.url, "--retries", "2",
                   "--backoff", "0.01", "-j", "2", "--no-progress", "--report", str(report)])
    cap = capsys.readouterr()
    assert rc == 1  # the 404
    assert "downloaded 2, skipped 1 (already there), failed 1" in cap.out
    assert "spec-1234-52000-0100.fits" in cap.out and "HTTP 404" in cap.out
    for name in (BOSS_FILE, BOSS_FILE2):
        plate = name.split("-")[1]
        got = out / plate / name
        assert got.read_bytes() == archive.src[name].read_bytes()
        assert not Path(str(got) + ".part").exists()
    assert not (out / "1234" / "spec-1234-52000-0100.fits").exists()
    boss_path = "sas/dr16/" + archive_path(BOSS_FILE)
    reqs = [r for p, r in archive.requests if p == boss_path]
    half = archive.src[BOSS_FILE].stat().st_size // 2
    assert reqs == [None, f"bytes={half}-"]  # dropped midway, then resumed where it stopped
    assert not any(SDSS_FILE in p for p, _ in archive.requests)
    assert sum(1 for p, _ in archive.requests if "1234" in p) == 1  # a 404 is not retried
    rep = json.loads(report.read_text())
    assert (rep["downloaded"], rep["skipped"], rep["failed"]) == (2, 1, 1)


def test_resume_existing_part_and_servers_without_range(archive, tmp_path):
    src = archive.src[BOSS_FILE2].read_bytes()
    url = spec_url(Target(10000, 57346, 9), archive.url)
    path = "sas/dr16/" + archive_path(BOSS_FILE2)
    dest = tmp_path / "a" / BOSS_FILE2
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(src[:1000])
    assert fetch(url, dest, retries=0) == "downloaded"
    assert dest.read_bytes() == src and archive.requests[-1] == (path, "bytes=1000-")
    # a server that ignores Range: the .part is rewritten from the start
    archive.no_range.add(path)
    dest2 = tmp_path / "b" / BOSS_FILE2
    dest2.parent.mkdir()
    Path(str(dest2) + ".part").write_bytes(b"x" * 777)
    assert fetch(url, dest2, retries=0) == "downloaded"
    assert dest2.read_bytes() == src
    # a .part that does not belong to the file (bytes wrong): the FITS check fails, it starts over
    archive.no_range.discard(path)
    dest3 = tmp_path / "c" / BOSS_FILE2
    dest3.parent.mkdir()
    Path(str(dest3) + ".part").write_bytes(b"\0" * 2880)
    assert fetch(url, dest3, retries=1, backoff=0.01) == "downloaded"
    assert dest3.read_bytes() == src
    assert fetch(url, dest3, retries=0) == "skipped"


def test_html_error_page_is_not_saved(archive, tmp_path):
    from fastspec.download import DownloadError

    path = "sas/dr16/" + archive_path(BOSS_FILE)
    archive.html.add(path)
    dest = tmp_path / BOSS_FILE
    with pytest.raises(DownloadError, match=r"failed after 2 attempts; last: downloaded file is not valid FITS"):
        fetch(spec_url(Target(4055, 55359, 6), archive.url), dest, retries=1, backoff=0.01)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_bad_list_exit_2(tmp_path, capsys):
    lst = tmp_path / "l.txt"
    lst.write_text("266 51602 -13\n")
    assert cli.main(["download", str(lst), "-d", str(tmp_path)]) == 2
    assert "l.txt: line 1: field fiber: -13 must be positive" in capsys.readouterr().err


def test_download_quiet_prints_only_failures(archive, tmp_path, capfd):
    lst = tmp_path / "list.txt"
    lst.write_text("266 51602 13\n1234 52000 100\n")
    rc = cli.main(["download", str(lst), "-d", str(tmp_path / "dl"), "--base-url", archive.url, "--retries", "0",
                   "-j", "1", "-q"])
    cap = capfd.readouterr()
    assert rc == 1 and cap.out == ""
    assert "1 of 2 file(s) failed" in cap.err
    assert (tmp_path / "dl" / "0266" / SDSS_FILE).read_bytes() == archive.src[SDSS_FILE].read_bytes()
