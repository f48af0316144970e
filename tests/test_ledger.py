"""The pool's shared validation ledger in process (worker/ledger.py): records keyed by a file's identity."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from worker.ledger import Ledger

OLD, NEW = (1, 10, 100, 1000), (1, 11, 120, 2000)


@contextlib.contextmanager
def _unlocked() -> Iterator[None]:
    yield


def test_a_record_speaks_only_for_the_file_version_it_names(tmp_path: Path):
    ledger, other = Ledger(str(tmp_path), _unlocked), Ledger(str(tmp_path), _unlocked)  # two workers
    assert not ledger.vouched("m.onnx", OLD) and not ledger.validated_before("m.onnx")
    ledger.vouch("m.onnx", OLD)
    assert other.vouched("m.onnx", OLD) and not other.vouched("m.onnx", NEW)
    assert other.validated_before("m.onnx")  # the previous version was served
    assert other.failure("m.onnx", NEW) is None
    ledger.record_failure("m.onnx", NEW, "protobuf parsing failed\nsecond line")
    assert other.failure("m.onnx", NEW) == "protobuf parsing failed\nsecond line"
    assert other.failure("m.onnx", OLD) is None  # about another version
    assert other.vouched("m.onnx", OLD)  # a failure leaves the vouched version alone
    assert sorted(other.entries()) == ["m.onnx"]
    assert not list(tmp_path.glob(".validated/.*")) and not list(tmp_path.glob(".failed/.*"))  # no temp left


def test_forget_removes_the_records_only_while_the_file_is_gone(tmp_path: Path):
    ledger = Ledger(str(tmp_path), _unlocked)
    path = tmp_path / "m.onnx@2"
    ledger.vouch("m.onnx@2", OLD)
    ledger.record_failure("m.onnx@2", NEW, "bad")
    path.write_bytes(b"back again")
    ledger.forget("m.onnx@2", str(path))  # copied in again before this worker noticed: kept
    assert ledger.vouched("m.onnx@2", OLD) and ledger.failure("m.onnx@2", NEW) == "bad"
    path.unlink()
    ledger.forget("m.onnx@2", str(path))
    assert not ledger.validated_before("m.onnx@2") and ledger.failure("m.onnx@2", NEW) is None
    assert ledger.entries() == []
