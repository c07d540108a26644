"""fastspec.atomic: the target appears only complete, failures leave the old file, and temporaries go away."""
import json

import pytest

from fastspec.atomic import atomic_path, temporary_name, write_json, write_text
from fastspec.errors import FastspecError


def test_renamed_when_complete(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("hello")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert not temporary_name(target).exists()


def test_unsynced_write_and_overwrite(tmp_path):
    target = tmp_path / "x.md"
    write_text(target, "one", sync=False)
    write_text(target, "two")
    assert target.read_text() == "two"


def test_every_fastspec_error_is_a_fastspec_error():
    from fastspec.download import DownloadError
    from fastspec.encode import EncodeError
    from fastspec.h5format import SpectraFormatError
    from fastspec.ingest import IngestError
    from fastspec.instruments import InstrumentError
    from fastspec.mock import MockError
    from fastspec.model import ModelConfigError
    from fastspec.report import ReportError
    from fastspec.train import TrainDataError

    for cls in (DownloadError, EncodeError, SpectraFormatError, IngestError, InstrumentError, MockError,
                ModelConfigError, ReportError, TrainDataError):
        assert issubclass(cls, FastspecError), cls
