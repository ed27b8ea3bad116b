"""Manifests (JSON/TOML, ${VAR} expansion, validation naming the field) and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manifests import build_backends, load_manifest
from manifests.loader import parse_manifest
from mcp_server.cli import cli_logic
from session.errors import ConfigurationError
from tests.fakes import FakeBackend


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_packaged_default_manifest_is_valid_and_enables_the_builtins():
    manifest = load_manifest()
    assert manifest.server.session_ttl == 300
    assert set(build_backends(manifest)) == {"bash", "vm", "browser"}


def test_json_and_toml_give_the_same_manifest(tmp_path):
    as_json = write(
        tmp_path,
        "m.json",
        json.dumps({"server": {"session_ttl": 12}, "resources": {"bash": {"config": {"timeout": 5}}}}),
    )
    as_toml = write(tmp_path, "m.toml", "[server]\nsession_ttl = 12\n[resources.bash]\nconfig = { timeout = 5 }\n")
    assert load_manifest(as_json) == load_manifest(as_toml)


def test_environment_variables_are_expanded_with_defaults():
    raw = {"resources": {"bash": {"config": {"cwd": "${WORK:-/tmp}", "env": {"K": "${KEY}"}}}}}
    manifest = parse_manifest(raw, environ={"KEY": "v"})
    assert manifest.resources["bash"].config == {"cwd": "/tmp", "env": {"K": "v"}}
    assert parse_manifest(raw, environ={"KEY": "v", "WORK": "/"}).resources["bash"].config["cwd"] == "/"


def test_an_unset_variable_without_default_names_the_field():
    with pytest.raises(ConfigurationError, match=r"resources\.bash\.config\.cwd: environment variable NOPE"):
        parse_manifest({"resources": {"bash": {"config": {"cwd": "${NOPE}"}}}}, environ={})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"server": {"session_ttl": -1}}, "server.session_ttl"),
        ({"server": {"sesion_ttl": 5}}, "server.sesion_ttl"),
        ({"server": {"transport": "carrier-pigeon"}}, "server.transport"),
        ({"server": {"ray_host_idle_exit": 0}}, "server.ray_host_idle_exit"),
        ({"resources": {"bash": {"enabled": "maybe"}}}, "resources.bash.enabled"),
        ({"resources": {"Bad_Name": {}}}, "resources"),
    ],
)
def test_wrong_values_are_refused_naming_the_field(raw, field):
    with pytest.raises(ConfigurationError, match=field.replace(".", r"\.")):
        parse_manifest(raw)


def test_unknown_backend_and_bad_class_paths_are_refused_naming_the_field():
    with pytest.raises(ConfigurationError, match=r"resources\.mine\.backend_class: 'mine' is not a built-in"):
        build_backends(parse_manifest({"resources": {"mine": {}}}))
    with pytest.raises(ConfigurationError, match="cannot import module 'no_such_pkg'"):
        build_backends(parse_manifest({"resources": {"mine": {"backend_class": "no_such_pkg.Backend"}}}))
    with pytest.raises(ConfigurationError, match="is not a Backend subclass"):
        build_backends(parse_manifest({"resources": {"mine": {"backend_class": "json.JSONDecoder"}}}))


def test_a_bad_default_config_is_refused_naming_the_field():
    with pytest.raises(ConfigurationError, match=r"resources\.bash\.config\.timeout"):
        build_backends(parse_manifest({"resources": {"bash": {"config": {"timeout": "soon"}}}}))
    with pytest.raises(ConfigurationError, match=r"resources\.vm\.config\.screen_size"):
        build_backends(parse_manifest({"resources": {"vm": {"config": {"screen_size": [1, 1]}}}}))


def test_a_users_backend_loads_by_import_path_without_touching_our_code():
    manifest = parse_manifest({"resources": {"counter": {"backend_class": "tests.fakes:FakeBackend"}}})
    backends = build_backends(manifest)
    assert isinstance(backends["counter"], FakeBackend)
    assert backends["counter"].name == "counter"


def test_cli_validate_tools_and_errors(tmp_path, capsys):
    assert cli_logic(["validate"]) == 0
    assert "manifest OK: bash (session" in capsys.readouterr().out
    assert cli_logic(["tools", "--json"]) == 0
    tools = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert {"bash_run", "vm_screenshot", "browser_snapshot", "create_session"} <= set(tools)
    assert tools["bash_run"]["inputSchema"]["required"] == ["command"]
    bad = write(tmp_path, "bad.toml", "[server]\nsession_ttl = 'never'\n")
    assert cli_logic(["validate", "--manifest", str(bad)]) == 2
    assert "server.session_ttl" in capsys.readouterr().err
    assert cli_logic(["serve", "--manifest", str(tmp_path / "missing.json")]) == 2
    assert "cannot read manifest" in capsys.readouterr().err


def test_session_and_backend_packages_never_import_mcp():
    import subprocess
    import sys

    code = (
        "import sys, session.engine, session.models, backends.bash, backends.vm, backends.browser, manifests;"
        "bad = [m for m in sys.modules if m == 'mcp' or m.startswith(('mcp.', 'mcp_server'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
