#!/usr/bin/env python3
"""Build the smpkprobes guest kernel images with clang + ld.lld.

Usage::

    python3 smpkprobes/machine/kernel/build.py [ARCH ...]      # default: x86_64

For each ARCH this writes ``images/<arch>/vmlinux``, ``images/<arch>/example_mod.ko``
and ``images/<arch>/manifest.json`` next to this file.  Both images are
statically linked ELF executables at fixed addresses, with their symbol
tables.  The build is byte-reproducible: the same clang/lld produce the same
bytes wherever the tree lives (sources are compiled from inside ``src/`` with
relative paths, no debug info, no build-id, ``.comment`` discarded).

Importable (stdlib only)::

    from smpkprobes.machine.kernel import build
    build.sources_digest("x86_64")          # what manifest.json's sources_sha256 should be
    build.build("x86_64", "/tmp/out")       # returns the manifest dict

Adding an architecture = one ``ARCHES`` entry + ``src/arch/<arch>/`` holding
``arch.h``, the assembly file(s) and the two linker scripts.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

# Per-architecture settings.  Keys:
#   target    clang --target triple
#   cflags    extra compiler flags for this arch (C and assembly)
#   asm       assembly sources, relative to src/arch/<arch>/
#   kernel_ld linker script for vmlinux, relative to src/arch/<arch>/
#   module_ld linker script for modules, relative to src/arch/<arch>/
#   ldflags   extra ld.lld flags for this arch
ARCHES = {
    "x86_64": {
        "target": "x86_64-unknown-none-elf",
        "cflags": [
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-mcmodel=small",
            "-fcf-protection=none",
        ],
        "asm": ["entry.S"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        "ldflags": [],
    },
    "arm": {
        # 32-bit ARM, ARM state only (no Thumb), little-endian AAPCS.  Cortex-A15
        # (Unicorn's model is set to match) for udiv/sdiv and ldrex/strex;
        # soft-float with no FPU so nothing touches VFP/NEON registers.  aeabi.c
        # (listed with the assembly: any source in the arch folder) supplies
        # the 64-bit division helper behind entry.S's __aeabi_uldivmod.
        "target": "armv7a-unknown-none-eabi",
        "cflags": [
            "-marm",
            "-mcpu=cortex-a15",
            "-mfloat-abi=soft",
            "-mfpu=none",
        ],
        "asm": ["entry.S", "aeabi.c"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        # lld's ARM default is 64 KiB pages, which pads the images to ~130 KiB.
        "ldflags": ["-z", "max-page-size=4096"],
    },
    "ppc": {
        # 32-bit big-endian SysV.  Generic "ppc" CPU (no isel, no e500/SPE, no
        # Altivec), soft-float so varargs never touch FPRs (MSR[FP] stays 0).
        # libgcc.S supplies the 64-bit division helpers.
        "target": "powerpc-unknown-none-elf",
        "cflags": [
            "-mcpu=ppc",
            "-msoft-float",
            "-mno-altivec",
        ],
        "asm": ["entry.S", "libgcc.S"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        "ldflags": [],
    },
    "arm64": {
        # AArch64 little-endian, Armv8.0 (Unicorn's default Cortex-A72: no LSE,
        # so atomics are LDAXR/STLXR loops), integer registers only so varargs
        # never touch the FP/SIMD file, no outline-atomics helpers, no
        # PAC/BTI landing pads.
        "target": "aarch64-unknown-none-elf",
        "cflags": [
            "-mgeneral-regs-only",
            "-mcmodel=small",
            "-mno-outline-atomics",
            "-mbranch-protection=none",
        ],
        "asm": ["entry.S"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        "ldflags": [],
    },
    "i386": {
        # 32-bit x86, cdecl (every argument on the stack, no -mregparm).  i686
        # for cmpxchg/xadd/cmov and ud2; integer registers only (no x87/SSE
        # in varargs or copies).
        "target": "i386-unknown-none-elf",
        "cflags": [
            "-march=i686",
            "-mgeneral-regs-only",
            "-fcf-protection=none",
        ],
        # divdi3.c: __udivdi3/__umoddi3 for vsnprintf's u64 (no libgcc linked).
        "asm": ["entry.S", "divdi3.c"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        "ldflags": [],
    },
    "sparc64": {
        # SPARC V9, 64-bit ABI (stack bias 2047), big-endian.  clang's sparc
        # driver defaults to the system assembler: use the integrated one.
        # Integer registers only (varargs never touch the FPU); medlow: every
        # address is below 4 GiB.  The delay-slot filler is off, so every delay
        # slot holds a nop and "restore" never sits in one: cpus/sparc64.py
        # steps branches with their delay slot and emulates register-window
        # fill traps, which Unicorn cannot report from a delay slot.
        "target": "sparcv9-unknown-none-elf",
        "cflags": [
            "-fintegrated-as",
            "-msoft-float",
            "-mcmodel=medlow",
            "-mllvm",
            "-disable-sparc-delay-filler",
        ],
        "asm": ["entry.S"],
        "kernel_ld": "kernel.ld",
        "module_ld": "module.ld",
        "ldflags": [],
    },
}

# Flags for every architecture.
COMMON_CFLAGS = [
    "-std=gnu11",
    "-O2",
    # Freestanding: no libc, no system headers, no builtin knowledge of libc.
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-nostdinc",
    "-fno-stack-protector",
    "-fno-pic",
    "-fno-pie",
    "-static",
    "-fno-common",
    # Stacks are walked through the frame-pointer chain, leaf functions too.
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",
    # Calls documented in the kernel's API must remain calls.
    "-fno-optimize-sibling-calls",
    "-fno-inline-functions",
    # __builtin_unreachable() (e.g. after the do_exit hypercall) becomes a trap
    # instruction instead of falling into whatever code follows.
    "-mllvm",
    "-trap-unreachable",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-jump-tables",
    # Reproducibility: nothing about the build host in the output.
    "-fno-ident",
    "-ffile-prefix-map=%(srcdir)s=.",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
]

COMMON_LDFLAGS = ["-static", "-nostdlib", "--build-id=none", "--no-undefined"]

# Arch-neutral sources, relative to src/.
KERNEL_SOURCES = ["kernel.c", "lib.c", "printk.c"]
MODULES = {"example_mod": ["modules/example_mod.c"]}

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(KERNEL_DIR, "src")
IMAGES_DIR = os.path.join(KERNEL_DIR, "images")

CLANG = os.environ.get("SMPK_CLANG", "clang")
LD = os.environ.get("SMPK_LD", "ld.lld")


def _arch(arch):
    try:
        return ARCHES[arch]
    except KeyError:
        raise ValueError("unknown arch %r (known: %s)" % (arch, ", ".join(sorted(ARCHES))))


def source_files(arch):
    """All source files that go into ``arch``'s images, relative to src/, sorted.

    That is every file under src/ except other architectures' arch/ folders.
    """
    _arch(arch)
    files = []
    for root, dirs, names in os.walk(SRC_DIR):
        rel_root = os.path.relpath(root, SRC_DIR)
        parts = [] if rel_root == "." else rel_root.split(os.sep)
        if len(parts) >= 2 and parts[0] == "arch" and parts[1] != arch:
            dirs[:] = []
            continue
        for name in names:
            if name.startswith(".") or name.endswith((".o", ".pyc")):
                continue
            files.append("/".join(parts + [name]))
    return sorted(files)


def _build_config(arch):
    """The flags and file lists used for ``arch``, as a canonical JSON blob."""
    return json.dumps(
        {
            "arch": arch,
            "arch_config": ARCHES[arch],
            "cflags": COMMON_CFLAGS,
            "ldflags": COMMON_LDFLAGS,
            "kernel_sources": KERNEL_SOURCES,
            "modules": MODULES,
        },
        sort_keys=True,
    ).encode()


def sources_digest(arch):
    """sha256 over ``arch``'s source files and its build configuration.

    For each file (sorted by path relative to src/): the path, a NUL, the
    content length in decimal, a NUL, the contents.  Then the build
    configuration (compiler/linker flags and file lists from this script) in
    the same framing under the name ``<build-config>``, so a flag change also
    makes committed images stale while edits to other arches' entries do not.
    """
    h = hashlib.sha256()

    def add(name, data):
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)

    for rel in source_files(arch):
        with open(os.path.join(SRC_DIR, rel), "rb") as f:
            add(rel, f.read())
    add("<build-config>", _build_config(arch))
    return h.hexdigest()


def clang_version():
    out = subprocess.run([CLANG, "--version"], check=True, capture_output=True, text=True).stdout
    return out.splitlines()[0].strip()


def _sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run(cmd):
    # Run from src/ so that every path the compiler sees is relative.
    res = subprocess.run(cmd, cwd=SRC_DIR, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            "command failed (%d): %s\n%s%s" % (res.returncode, " ".join(cmd), res.stdout, res.stderr)
        )
    if res.stderr.strip():
        sys.stderr.write(res.stderr)


def _cflags(arch):
    cfg = ARCHES[arch]
    flags = ["--target=" + cfg["target"]]
    flags += [f % {"srcdir": SRC_DIR} for f in COMMON_CFLAGS]
    flags += cfg["cflags"]
    flags += ["-I", ".", "-I", "arch/" + arch]
    return flags


def build(arch, outdir):
    """Build ``arch``'s vmlinux and example_mod.ko into ``outdir``.

    Also writes ``outdir/manifest.json``; returns the manifest as a dict.
    """
    cfg = _arch(arch)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    cflags = _cflags(arch)
    arch_dir = "arch/" + arch

    with tempfile.TemporaryDirectory(prefix="smpk-kbuild-") as tmp:

        def compile_one(src):
            obj = os.path.join(tmp, src.replace("/", "__") + ".o")
            _run([CLANG] + cflags + ["-c", src, "-o", obj])
            return obj

        # Link order is fixed (C sources in list order, then assembly).
        objs = [compile_one(s) for s in KERNEL_SOURCES]
        objs += [compile_one(arch_dir + "/" + s) for s in cfg["asm"]]

        vmlinux_tmp = os.path.join(tmp, "vmlinux")
        _run(
            [LD]
            + COMMON_LDFLAGS
            + cfg["ldflags"]
            + ["-T", arch_dir + "/" + cfg["kernel_ld"], "-o", vmlinux_tmp]
            + objs
        )

        mod_tmp = {}
        for mod, srcs in sorted(MODULES.items()):
            mobjs = [compile_one(s) for s in srcs]
            mod_tmp[mod] = os.path.join(tmp, mod + ".ko")
            _run(
                [LD]
                + COMMON_LDFLAGS
                + cfg["ldflags"]
                + ["-T", arch_dir + "/" + cfg["module_ld"],
                   "--just-symbols=" + vmlinux_tmp, "-o", mod_tmp[mod]]
                + mobjs
            )

        # Install only after everything linked, so a failed build leaves the
        # previous images alone.
        shutil.copyfile(vmlinux_tmp, os.path.join(outdir, "vmlinux"))
        for mod, path in mod_tmp.items():
            shutil.copyfile(path, os.path.join(outdir, mod + ".ko"))

    manifest = {
        "clang": clang_version(),
        "sources_sha256": sources_digest(arch),
        "vmlinux_sha256": _sha256_file(os.path.join(outdir, "vmlinux")),
        "example_mod_sha256": _sha256_file(os.path.join(outdir, "example_mod.ko")),
    }
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv):
    arches = list(ARCHES) if argv == ["--all"] else (argv or ["x86_64"])
    unknown = [a for a in arches if a not in ARCHES]
    if unknown:
        sys.stderr.write("build.py: unknown arch %s (known: %s)\n"
                         % (", ".join(unknown), ", ".join(sorted(ARCHES))))
        return 2
    for arch in arches:
        outdir = os.path.join(IMAGES_DIR, arch)
        m = build(arch, outdir)
        print("%s: vmlinux %s, example_mod.ko %s -> %s"
              % (arch, m["vmlinux_sha256"][:16], m["example_mod_sha256"][:16],
                 os.path.relpath(outdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
