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

	.section .kprobes.text, "ax", @progbits

	.globl __hypercall_start
__hypercall_start:

/* void __hc_console_write(const char *buf, unsigned long len) */
FUNC(__hc_console_write)
	blr
ENDFUNC(__hc_console_write)

/* void __hc_msleep(unsigned long ms) */
FUNC(__hc_msleep)
	blr
ENDFUNC(__hc_msleep)

/* void __hc_schedule(void) */
FUNC(__hc_schedule)
	blr
ENDFUNC(__hc_schedule)

/* void __hc_do_exit(long code) -- never returns */
FUNC(__hc_do_exit)
	blr
ENDFUNC(__hc_do_exit)

/* unsigned long __hc_ktime_get_ns(void) */
FUNC(__hc_ktime_get_ns)
	blr
ENDFUNC(__hc_ktime_get_ns)

/* Return address of every task's top frame: the task's function returned. */
FUNC(__hc_task_return)
	blr
ENDFUNC(__hc_task_return)

/* Return address of calls the machine makes into the guest (nested calls). */
FUNC(__hc_call_return)
	blr
ENDFUNC(__hc_call_return)

	.globl __hypercall_end
__hypercall_end:

/* Idle loop for CPUs with nothing to run: a branch to itself. */
FUNC(cpu_idle)
1:	b	1b
ENDFUNC(cpu_idle)

/*
 * A jprobe handler ends with a call here; the probe core traps on the
 * breakpoint, restores the registers and stack saved at the probe hit and
 * resumes the probed function.  The blr is not normally reached.
 */
FUNC(jprobe_return)
	tw	31, 0, 0
	blr
ENDFUNC(jprobe_return)

/*
 * kretprobes redirect return addresses (LR) here.  The probe core traps on
 * the breakpoint, runs the return handlers and resumes at the real return
 * address.
 */
FUNC(kretprobe_trampoline)
	tw	31, 0, 0
	nop
ENDFUNC(kretprobe_trampoline)

	.section .note.GNU-stack, "", @progbits
