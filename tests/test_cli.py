"""The console script: version, list, help with examples, lazy imports, errors naming missing extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cirlab import __version__
from cirlab.cli.main import app, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_list_names_backbones(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("hf-clip", "open-clip", "tiny"):
        assert f"  {name}\n" in out
    assert "backbones:" in out and "methods:" in out and "benchmarks:" in out and "corpora:" in out
    assert "captioners:\n  hf-captioner\n  mllm\n" in out and "rewriters:\n  hf-rewriter\n" in out


def test_help_does_not_import_torch():
    code = "import sys; from cirlab.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


@pytest.mark.parametrize("command", sorted({c.name or c.callback.__name__ for c in app.registered_commands}))
def test_every_command_has_an_example(command):
    cmd = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    assert "Example:" in (cmd.callback.__doc__ or ""), f"{command} --help has no example"


def test_unknown_command_fails(capsys):
    assert main(["no-such-command"]) != 0


def test_missing_extra_names_it():
    from cirlab._optional import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"pip install 'cirlab\[faiss\]'"):
        require("cirlab_no_such_module", extra="faiss")


def test_exit_codes_of_commands_propagate():
    import typer

    probe = typer.Typer()

    @probe.command()
    def fail() -> None:
        raise typer.Exit(3)

    @probe.command()
    def ok() -> None:
        """Succeeds."""

    import sys

    main_module = sys.modules["cirlab.cli.main"]

    original = main_module.app
    main_module.app = probe
    try:
        assert main_module.main(["fail"]) == 3
        assert main_module.main(["ok"]) == 0
    finally:
        main_module.app = original


def test_serve_refuses_a_port_out_of_range(tmp_path, capsys):
    pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
    from cirlab.features.cache import FeatureCache
    from cirlab.index import build_index
    from imagefiles import make_gallery

    make_gallery(tmp_path / "images", 2)
    build_index(tmp_path / "images", tmp_path / "index", backbone="tiny", cache=FeatureCache(tmp_path / "cache"),
                log=lambda m: None)  # fmt: skip
    assert main(["serve", str(tmp_path / "index"), "--port", "99999"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "Invalid value for '--port'" in captured.err and "65535" in captured.err
