"""The server's X authority file: per-display cookies, inherited entries kept, environment restored."""

from __future__ import annotations

import os
from pathlib import Path

from Xlib import xauth

from backends.vm.xauth import ServerAuthority, encode_entry


def test_entries_come_and_go_and_the_previous_xauthority_returns(tmp_path: Path, monkeypatch):
    original = tmp_path / "original"
    original.write_bytes(encode_entry("0", b"u" * 16))  # the embedding program's own display
    monkeypatch.setenv("XAUTHORITY", str(original))
    authority = ServerAuthority()
    authority.add(5, b"a" * 16)
    authority.add(6, b"b" * 16)
    ours = Path(os.environ["XAUTHORITY"])
    assert ours != original
    cookies = {entry[2]: entry[4] for entry in xauth.Xauthority(str(ours)).entries}
    assert cookies == {b"0": b"u" * 16, b"5": b"a" * 16, b"6": b"b" * 16}
    authority.remove(5)
    assert {entry[2] for entry in xauth.Xauthority(str(ours)).entries} == {b"0", b"6"}
    authority.remove(6)
    assert os.environ["XAUTHORITY"] == str(original)
    assert not ours.parent.exists()
