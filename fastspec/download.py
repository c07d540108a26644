"""Download SDSS DR16 spec-lite files for a list of (plate, mjd, fiber) from the SDSS Science Archive Server.

Each file goes to `<DIR>/<plate>/spec-PPPP-MMMMM-FFFF.fits` through `<name>.part`: an interrupted download is
resumed with an HTTP Range request, the size is checked against Content-Length / Content-Range, the file must
open as FITS, and only then is it renamed (synced, `fastspec.atomic.publish`) to its final name. Files already there are skipped.
Transient failures are retried with exponential backoff; permanent ones (404 ...) are reported at once.
Standard library only (urllib): the archive needs nothing more.

Public API: `read_targets(path)`, `Target`, `spec_url(target, base_url, template)`, `fetch(url, dest, ...)`,
`download(targets, directory, ...) -> DownloadReport`, `DownloadError`.
"""
from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from . import __version__, atomic
from .errors import FastspecError
from .fits import FitsError, open_fits

DEFAULT_BASE_URL = "https://data.sdss.org/sas/dr16"
# DR16 reductions: SDSS-I/II spectrograph plates (run2d 26), BOSS/eBOSS plates from 3510 on (run2d v5_13_0).
BOSS_FIRST_PLATE = 3510
RUN2D_SDSS = "26"
RUN2D_BOSS = "v5_13_0"
DEFAULT_TEMPLATE = "{base}/{survey}/spectro/redux/{run2d}/spectra/lite/{plate:04d}/spec-{plate:04d}-{mjd:05d}-{fiber:04d}.fits"
TEMPLATE_FIELDS = ("base", "survey", "run2d", "plate", "mjd", "fiber")
_CHUNK = 1 << 20
_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 451}
_SPEC_NAME = re.compile(r"spec-(\d+)-(\d+)-(\d+)(?:\.fits)?$", re.IGNORECASE)


class DownloadError(FastspecError):
    """A download that failed for good; the message names the URL and why."""


class _Retry(Exception):
    """A failure worth another attempt (dropped connection, short file, server error)."""


@dataclass(frozen=True)
class Target:
    plate: int
    mjd: int
    fiber: int

    @property
    def name(self) -> str:
        return f"spec-{self.plate:04d}-{self.mjd:05d}-{self.fiber:04d}.fits"

    @property
    def boss(self) -> bool:
        return self.plate >= BOSS_FIRST_PLATE


def read_targets(path) -> list[Target]:
    """(plate, mjd, fiber) per line, separated by spaces, tabs or commas; '#' starts a comment; a header line
    (e.g. `plate,mjd,fiber`) is allowed; a line may also be a file name `spec-PLATE-MJD-FIBER.fits`.
    Duplicates are dropped (first kept). Raises ValueError naming the file, line and field."""
    path = os.fspath(path)
    out, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            m = _SPEC_NAME.search(text)
            if m and len(text.split()) == 1:
                tokens = list(m.groups())
            else:
                tokens = [t for t in re.split(r"[,\s]+", text) if t]
            if not out and not seen and all(not t.lstrip("-").isdigit() for t in tokens):
                continue  # header line
            if len(tokens) != 3:
                raise ValueError(f"{path}: line {lineno}: expected 3 fields (plate mjd fiber), got {len(tokens)}: "
                                 f"{text!r}")
            values = []
            for name, tok in zip(("plate", "mjd", "fiber"), tokens):
                try:
                    v = int(tok)
                except ValueError:
                    raise ValueError(f"{path}: line {lineno}: field {name}: {tok!r} is not an integer") from None
                if v <= 0:
                    raise ValueError(f"{path}: line {lineno}: field {name}: {v} must be positive")
                values.append(v)
            t = Target(*values)
            if t not in seen:
                seen.add(t)
                out.append(t)
    return out


def check_template(template: str) -> None:
    """Raise ValueError when `template` uses a field other than TEMPLATE_FIELDS."""
    try:
        template.format(base="", survey="sdss", run2d="26", plate=1, mjd=1, fiber=1)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"path template {template!r}: {type(err).__name__} {err}; fields available: "
            + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        ) from None


def spec_url(target: Target, base_url: str = DEFAULT_BASE_URL, template: str | None = None) -> str:
    """The DR16 spec-lite URL of `target`: run2d 26 under sdss/ for plates < 3510, v5_13_0 under eboss/ else."""
    return (template or DEFAULT_TEMPLATE).format(
        base=base_url.rstrip("/"),
        survey="eboss" if target.boss else "sdss",
        run2d=RUN2D_BOSS if target.boss else RUN2D_SDSS,
        plate=target.plate,
        mjd=target.mjd,
        fiber=target.fiber,
    )


def local_path(target: Target, directory) -> str:
    return os.path.join(os.fspath(directory), f"{target.plate:04d}", target.name)


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes a-b/N` or `bytes */N`."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return first, total


def _fetch_once(url: str, part: str, timeout: float) -> None:
    """One HTTP request: continue `part` from its current size (Range) or start it over."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": f"fastspec/{__version__} (+download)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            _, total = _total_from_content_range(err.headers.get("Content-Range"))
            if total == have:
                return  # the partial file was already complete
            os.remove(part)
            raise _Retry(f"server refused the resume range at byte {have} (size {total}); starting over") from None
        if err.code in _PERMANENT_HTTP:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        raise _Retry(f"HTTP {err.code} {err.reason}") from None
    with resp:
        if resp.status == 206:
            first, total = _total_from_content_range(resp.headers.get("Content-Range"))
            if first != have:
                os.remove(part)
                raise _Retry(f"server resumed at byte {first}, not {have}; starting over")
            mode = "ab"
        elif resp.status == 200:
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"  # no Range support, or a fresh start
        else:
            raise _Retry(f"unexpected HTTP status {resp.status}")
        with open(part, mode) as fh:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                fh.write(chunk)
    size = os.path.getsize(part)
    if total is not None and size != total:
        # keep the .part: the next attempt resumes from here
        raise _Retry(f"connection ended after {size} of {total} bytes")


def _verify_fits(part: str, url: str) -> None:
    try:
        with open_fits(part, reader="astropy") as f:
            if not f.names:
                raise FitsError(f"{part}: no HDU")
    except FitsError as err:
        os.remove(part)
        raise _Retry(f"downloaded file is not valid FITS ({str(err).split(': ', 1)[-1]}); starting over") from None


def fetch(url: str, dest, retries: int = 5, timeout: float = 60.0, backoff: float = 2.0) -> str:
    """Download `url` to `dest` (through `dest`.part); returns 'downloaded' or 'skipped' (already there).

    Retries transient failures up to `retries` times, sleeping backoff·2^k seconds; raises DownloadError.
    """
    dest = os.fspath(dest)
    if os.path.exists(dest):
        return "skipped"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, part, timeout)
            _verify_fits(part, url)
            atomic.publish(part, dest)
            return "downloaded"
        except DownloadError:
            if os.path.exists(part) and os.path.getsize(part) == 0:
                os.remove(part)
            raise
        except _Retry as err:
            last = str(err)
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, IncompleteRead
            reason = getattr(err, "reason", None)
            last = f"{type(err).__name__}: {reason if reason is not None else err}"
    raise DownloadError(f"{url}: failed after {retries + 1} attempts; last: {last}")


@dataclass
class DownloadResult:
    target: str
    url: str
    path: str
    status: str  # downloaded / skipped / failed
    reason: str = ""
    seconds: float = 0.0


@dataclass
class DownloadReport:
    results: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> list:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        lines = [f"downloaded {self.count('downloaded')}, skipped {self.count('skipped')} (already there), "
                 f"failed {self.count('failed')}"]
        for r in self.failed:
            lines.append(f"  FAILED {r.target}: {r.reason}")
        return "\n".join(lines)

    def write_json(self, path) -> None:
        atomic.write_json(path, {"downloaded": self.count("downloaded"), "skipped": self.count("skipped"),
                          "failed": self.count("failed"), "files": [asdict(r) for r in self.results]})


def download(targets, directory, base_url: str = DEFAULT_BASE_URL, template: str | None = None,
             retries: int = 5, jobs: int = 4, timeout: float = 60.0, backoff: float = 2.0,
             progress: bool = True) -> DownloadReport:
    """Fetch every target's spec-lite file into `directory` with `jobs` parallel connections."""
    from tqdm import tqdm

    if template:
        check_template(template)
    targets = list(targets)

    def one(t: Target) -> DownloadResult:
        url = spec_url(t, base_url, template)
        dest = local_path(t, directory)
        t0 = time.perf_counter()
        try:
            status = fetch(url, dest, retries=retries, timeout=timeout, backoff=backoff)
            return DownloadResult(t.name, url, dest, status, seconds=time.perf_counter() - t0)
        except DownloadError as err:
            return DownloadResult(t.name, url, dest, "failed", str(err), time.perf_counter() - t0)

    report = DownloadReport()
    bar = tqdm(total=len(targets), unit="file", desc="download", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for res in pool.map(one, targets):
            report.results.append(res)
            bar.update(1)
            bar.set_postfix(failed=report.count("failed"), refresh=False)
    bar.close()
    return report
