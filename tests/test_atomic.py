import pytest

from bbem.atomic import atomic_output, partial_path
from bbem.errors import UserError


def test_file_appears_only_when_complete(tmp_path):
    out = tmp_path / "a.txt"
    with atomic_output(out) as tmp:
        tmp.write_text("x")
        assert not out.exists()
    assert out.read_text() == "x"
    assert not partial_path(out).exists()


def test_failure_leaves_nothing_and_keeps_old(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "zarr.json").write_text("{}")  # a zarr store bbem wrote: overwrite may replace it
    (out / "old").write_text("keep")

    def killed_half_way():
        with atomic_output(out, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "new").write_text("half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        killed_half_way()
    assert (out / "old").read_text() == "keep"
    assert not partial_path(out).exists()


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("x")
    with pytest.raises(UserError, match="--overwrite"), atomic_output(out):
        pass
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text("y")
    assert out.read_text() == "y"
