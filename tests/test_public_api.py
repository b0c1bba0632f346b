import smpkprobes


def test_public_names_are_pinned():
    """The public API is exactly the names of API.md (plus a few documented extras)."""
    import types
    public = {n for n in dir(smpkprobes) if not n.startswith("_")
              and not isinstance(getattr(smpkprobes, n), types.ModuleType)}
    assert public == {"Machine", "Kprobe", "Kretprobe", "Jprobe", "KprobeError", "Oops",
                      "OopsRecord", "RunawayError", "SimulationError", "MachineStatistics",
                      "jprobe_return", "regs_return_value", "replay_factory",
                      "HwBreakpointAttr"}


def test_kprobe_error_is_an_oserror():
    """KprobeError subclasses OSError and carries errno."""
    e = smpkprobes.KprobeError(22, "x", index=3)
    assert isinstance(e, OSError) and e.errno == 22 and e.index == 3
