"""`replicatord` starts without the `local` extra; `load` and `demo` name it when it is missing.

The import check runs in a fresh interpreter so that what this test process already imported
cannot hide a regression. tests/test_install.py checks the same against a real install.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from replicatord import cli

CN = "cn-north-1"


def _modules_after(code: str) -> set[str]:
    """Top-level modules imported by a fresh interpreter that runs `code`."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


# The `local` extra's packages; moto[server] brings flask and werkzeug.
EXTRA_ONLY = {"faker", "moto", "flask", "werkzeug"}


def test_production_commands_import_nothing_from_the_local_extra() -> None:
    # Everything run, check-config, provision and status import, and the full parser (which
    # defines load's flags). These packages are installed in the dev venv, so an eager import
    # anywhere on these paths shows up here.
    imported = _modules_after(
        "import replicatord.cli as c; c.build_parser()\n"
        "import replicatord.daemon, replicatord.ops.provision, replicatord.ops.status"
    )
    assert "replicatord" in imported and "aiobotocore" in imported  # the probe really ran
    assert not imported & EXTRA_ONLY, sorted(imported & EXTRA_ONLY)


def test_the_local_extra_check_sees_installed_packages() -> None:
    # The dev venv has the extra: the check passes, so `load` and `demo` would go on to run.
    cli.require_local_extra("load")
    cli.require_local_extra("demo")


def test_load_without_its_extra_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seam is the table of modules each command needs; tests/test_install.py checks the same
    # against a real install without the extra.
    monkeypatch.setitem(cli.LOCAL_EXTRA_MODULES, "load", ("faker", "replicatord_no_such_module"))
    assert cli.main(["load", "-t", "x", "-r", CN]) == cli.EXIT_STARTUP
    err = capsys.readouterr().err
    assert err == (
        "error: 'replicatord load' needs the 'local' extra (replicatord_no_such_module not installed): "
        "pip install 'replicatord[local]'\n"
    )


def test_the_daemon_makes_itself_non_dumpable() -> None:
    """No core file and no ptrace by same-user processes: the peer secret stays in the process."""
    script = ("import ctypes; from replicatord.aws import make_non_dumpable; "
              "before = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0); ok = make_non_dumpable(); "
              "print(before, ok, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["1", "True", "0"]


READS_PEER_KEYS = """
import asyncio, ctypes, yaml
from replicatord.aws import Aws
from replicatord.config import parse_topology, resolve_settings
from replicatord.local.world import topology_document
from replicatord.metrics import Metrics

class Ssm:
    async def get_parameter(self, **kw):
        return {"Parameter": {"Value": "v"}}

doc = topology_document({"cn-north-1": "http://127.0.0.1:9", "ap-southeast-1": "http://127.0.0.1:10"})
aws = Aws(resolve_settings(parse_topology(yaml.safe_dump(doc)), "cn-north-1", "x"), Metrics())
aws.local["ssm"] = Ssm()
before = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
asyncio.run(aws._peer_keys("ap-southeast-1"))
print(before, ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))
"""


def test_every_command_that_reads_the_peer_secret_is_non_dumpable() -> None:
    """status, dlq redrive and preflight read the key pair through Aws, as the daemon does."""
    out = subprocess.run([sys.executable, "-c", READS_PEER_KEYS], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["1", "0"]


def test_the_peer_secret_is_never_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from replicatord.config import ConfigError
    from replicatord.ops.provision import read_key_pair

    monkeypatch.setenv("REPLICATORD_PEER_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setattr(sys, "stdin", io.StringIO("AKID\nfrom-stdin\n"))
    with pytest.raises(ConfigError) as raised:
        read_key_pair()
    assert len(raised.value.lines) == 1 and "not read" in raised.value.lines[0]
    assert "s3cret" not in raised.value.lines[0]


def test_the_peer_secret_comes_from_a_file_or_stdin_not_echoed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from replicatord.ops.provision import read_key_pair

    monkeypatch.delenv("REPLICATORD_PEER_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("REPLICATORD_PEER_ACCESS_KEY_ID", raising=False)
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    assert read_key_pair("AKID", str(secret)) == ("AKID", "from-file")
    assert "warning" not in capsys.readouterr().err
    secret.chmod(0o644)
    assert read_key_pair("AKID", str(secret)) == ("AKID", "from-file")
    assert "can be read by other users" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("AKIDPIPED\nfrom-pipe\n"))
    assert read_key_pair() == ("AKIDPIPED", "from-pipe")
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-pipe-only\n"))
    assert read_key_pair("AKID") == ("AKID", "from-pipe-only")
