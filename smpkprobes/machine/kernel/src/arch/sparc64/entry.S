/* SPDX-License-Identifier: MIT */
/*
 * sparc64 guest entry points that have to be assembly: the hypercall stubs
 * and the probe core's trap points.  Everything lives in .kprobes.text,
 * which the linker script brackets with __kprobes_text_start/_end; the probe
 * core refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (arguments in %o0, %o1; result in %o0; it returns to
 * %o7 + 8 itself).  Each stub's "retl; nop" is only a fallback for a machine
 * that does not hook it.  The stubs are leaves: no save, so they run in the
 * caller's register window, where %o7 is the return address.
 *
 * The breakpoint is "ta 0x70" (Linux sparc64's BREAKPOINT_INSTRUCTION);
 * Unicorn reports it as interrupt 0x100 + 0x70.  Every delay slot here holds
 * a nop, as in the compiled kernel (the build turns clang's delay-slot filler
 * off; see build.py and cpus/sparc64.py).
 */

#define FUNC(name)		\
	.globl name;		\
	.type name, #function;	\
	.align 4;		\
	name:

#define ENDFUNC(name)		\
	.size name, . - name

/* What entry-common.S needs in this arch's syntax. */
#define ARCH_RET		retl; nop
#define ARCH_IDLE		1:	ba,a	1b; nop
#define ARCH_BREAKPOINT		ta	0x70

#include "../entry-common.S"

	.section .note.GNU-stack, "", @progbits
