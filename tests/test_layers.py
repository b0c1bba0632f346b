"""The layers the tree shows are the layers the imports keep: the machine knows nothing of the
probe core or the tools, the probe core reaches the machine only through `KernelServices`
and the hw_breakpoint layer only through `HwBreakpointServices` (machine/_services.py)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "smpkprobes"


def _runtime_imports(path: Path) -> set[str]:
    """The modules `path` imports at run time (not under `if TYPE_CHECKING:`), as dotted
    names relative to the smpkprobes package ("machine._cpu", "cpus", ...)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    pkg = path.parent.relative_to(PKG).parts
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("smpkprobes."):
                name = node.module.removeprefix("smpkprobes.")
            else:
                continue
            found.add(name)
    return found


def _modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).glob("*.py"))


@pytest.mark.parametrize("path", _modules("machine"), ids=lambda p: p.name)
def test_the_machine_imports_no_probe_core_and_no_tool(path):
    """No module of smpkprobes/machine/ imports the probe core, the tools or the facade."""
    bad = {m for m in _runtime_imports(path)
           if m.split(".")[0] in ("kprobes", "tools", "_system")}
    assert not bad, bad


@pytest.mark.parametrize("path", _modules("kprobes"), ids=lambda p: p.name)
def test_the_probe_core_reaches_the_machine_only_through_kernel_services(path):
    """A probe-core module imports, of the machine, only machine._services, and neither the
    tools nor the composed system (`_system`)."""
    imports = _runtime_imports(path)
    machine = {m for m in imports if m.startswith("machine")}
    assert machine <= {"machine._services"}, machine
    tools = {m for m in imports if m.startswith("tools") or m == "_system"}
    assert not tools, tools


@pytest.mark.parametrize("path", _modules("hw_breakpoint"), ids=lambda p: p.name)
def test_hw_breakpoint_reaches_the_machine_only_through_its_services(path):
    """A hw_breakpoint module imports, of the machine, only machine._services; nothing of
    the probe core, of the tools, or of the composed system (`trace mem:` is given its
    machine factory by the CLI)."""
    imports = _runtime_imports(path)
    machine = {m for m in imports if m.startswith("machine")}
    assert machine <= {"machine._services"}, machine
    assert not {m for m in imports if m.startswith("kprobes")}
    tools = {m for m in imports if m.startswith("tools") or m == "_system"}
    assert not tools, tools


def test_hw_breakpoint_is_given_its_services_not_the_machine():
    """`m.hw_breakpoints` holds a `HwBreakpointServices`, whose members are the ones it
    lists; anything else is a clear AttributeError."""
    from smpkprobes import Machine
    from smpkprobes.machine._services import HwBreakpointServices
    m = Machine(cpus=2)
    kernel = m.hw_breakpoints._kernel
    assert type(kernel) is HwBreakpointServices
    assert kernel.cpus == tuple(m.cpus) and kernel.ncpus == 2 and kernel.arch == "x86_64"
    with pytest.raises(AttributeError, match="reaches the machine only through"):
        kernel.memory
