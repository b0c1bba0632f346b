/* SPDX-License-Identifier: MIT */
/*
 * x86_64 guest entry points that have to be assembly: the hypercall stubs
 * and the probe core's trap points.  Everything lives in .kprobes.text,
 * which the linker script brackets with __kprobes_text_start/_end; the probe
 * core refuses to put probes there.
 *
 * Hypercalls: the machine hooks [__hypercall_start, __hypercall_end) and
 * emulates each stub (SysV arguments in rdi, rsi; result in rax), then
 * returns to the caller itself.  Each stub's single "ret" is only a
 * fallback for a machine that does not hook it.
 */

#define FUNC(name)		\
	.globl name;		\
	.type name, @function;	\
	name:

#define ENDFUNC(name)		\
	.size name, . - name

/* What entry-common.S needs in this arch's syntax. */
#define ARCH_RET		ret
#define ARCH_IDLE		1:	jmp	1b
#define ARCH_BREAKPOINT		int3

#include "../entry-common.S"

	.section .note.GNU-stack, "", @progbits
