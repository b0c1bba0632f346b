"""The command line's front door: bad input is one clear line, not a traceback."""

from smpkprobes.tools._cli import main


def test_unsupported_arch_is_a_clear_error(capsys):
    """`smpkprobes demo --arch ia64` exits 2 with the reason on stderr."""
    assert main(["demo", "--arch", "ia64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smpkprobes: error: architecture 'ia64' is not supported")
    assert "Traceback" not in err


def test_unknown_arch_lists_the_available_ones(capsys):
    """An unknown arch names the available ones."""
    assert main(["demo", "--arch", "vax"]) == 2
    assert "available: x86_64" in capsys.readouterr().err
