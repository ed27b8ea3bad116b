"""A desktop's authority file: one cookie both libXau (wildcard) and python-xlib (local, by host name) find."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from Xlib import xauth

from backends.vm.xauth import FAMILY_LOCAL, FAMILY_WILD, desktop_entries, write_authority


def test_python_xlib_finds_the_cookie_for_any_display_of_the_named_host(tmp_path: Path) -> None:
    path = tmp_path / "Xauthority"
    write_authority(path, desktop_entries(b"c" * 16, "sandbox"))
    assert path.stat().st_mode & 0o777 == 0o600
    # python-xlib's stubs type the family and display number as bytes; they are ints.
    authority: Any = xauth.Xauthority(str(path))
    assert {entry[0] for entry in authority.entries} == {FAMILY_WILD, FAMILY_LOCAL}
    assert authority.get_best_auth(FAMILY_LOCAL, b"sandbox", 123) == (b"MIT-MAGIC-COOKIE-1", b"c" * 16)


def test_rewriting_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "Xauthority"
    write_authority(path, desktop_entries(b"a" * 16, "h"))
    write_authority(path, desktop_entries(b"b" * 16, "h"))
    cookies = {entry[4] for entry in xauth.Xauthority(str(path)).entries}
    assert cookies == {b"b" * 16}
    assert [p.name for p in tmp_path.iterdir()] == ["Xauthority"]
