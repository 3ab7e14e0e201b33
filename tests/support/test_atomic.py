"""helpers.support.atomic: a write either replaces the file whole or leaves the old one as it was."""
import pytest

from helpers.support.atomic import replacing, write_json, write_text


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    write_text(path, "a\n1\n")
    write_text(path, "a\n2\n", fsync=True)
    assert path.read_text() == "a\n2\n" and [p.name for p in path.parent.iterdir()] == ["results.csv"]
    write_json(tmp_path / "x.json", {"é": [1, 2]})
    assert (tmp_path / "x.json").read_text() == '{\n "é": [\n  1,\n  2\n ]\n}'


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half of the new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_a_folder_replaces_a_folder(tmp_path):
    final = tmp_path / "ckpt-000002"
    final.mkdir()
    (final / "stale.pt").write_bytes(b"x")
    with replacing(final) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_bytes(b"new")
    assert [p.name for p in final.iterdir()] == ["state.pt"] and len(list(tmp_path.iterdir())) == 1
