/* SPDX-License-Identifier: MIT */
/*
 * arm64 guest entry points that have to be assembly: the hypercall stubs
 * and the probe core's trap points.  Everything lives in .kprobes.text,
 * which the linker script brackets with __kprobes_text_start/_end; the probe
 * core refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (AAPCS64 arguments in x0, x1; result in x0), then
 * returns to the caller through x30 itself.  Each stub's single "ret" is
 * only a fallback for a machine that does not hook it.
 *
 * The kprobes breakpoint is "brk #0x4" (the immediate Linux uses for
 * KPROBES_BRK_IMM).  Unicorn reports every BRK as interrupt 7 with the PC
 * still at the BRK.
 */

#define FUNC(name)		\
	.globl name;		\
	.type name, %function;	\
	.p2align 2;		\
	name:

#define ENDFUNC(name)		\
	.size name, . - name

/* What entry-common.S needs in this arch's syntax. */
#define ARCH_RET		ret
#define ARCH_IDLE		1:	b	1b
#define ARCH_BREAKPOINT		brk	#0x4

#include "../entry-common.S"

	.section .note.GNU-stack, "", %progbits
