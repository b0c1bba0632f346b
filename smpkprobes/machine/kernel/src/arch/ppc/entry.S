/* SPDX-License-Identifier: MIT */
/*
 * 32-bit PowerPC guest entry points that have to be assembly: the hypercall
 * stubs and the probe core's trap points.  Everything lives in .kprobes.text,
 * which the linker script brackets with __kprobes_text_start/_end; the probe
 * core refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (SysV arguments in r3, r4; result in r3), then returns
 * to LR itself.  Each stub's single "blr" is only a fallback for a machine
 * that does not hook it.
 *
 * The breakpoint is "tw 31,0,0" (0x7fe00008, the kernel's BREAKPOINT_INSN),
 * an unconditional trap.
 */

#define FUNC(name)		\
	.globl name;		\
	.type name, @function;	\
	.p2align 2;		\
	name:

#define ENDFUNC(name)		\
	.size name, . - name

/* What entry-common.S needs in this arch's syntax. */
#define ARCH_RET		blr
#define ARCH_IDLE		1:	b	1b
#define ARCH_BREAKPOINT		tw	31, 0, 0

#include "../entry-common.S"

	.section .note.GNU-stack, "", @progbits
