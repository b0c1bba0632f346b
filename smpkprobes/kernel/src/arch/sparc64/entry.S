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

	.section .kprobes.text, "ax", @progbits
	.align 4

	.globl __hypercall_start
__hypercall_start:

/* void __hc_console_write(const char *buf, unsigned long len) */
FUNC(__hc_console_write)
	retl
	 nop
ENDFUNC(__hc_console_write)

/* void __hc_msleep(unsigned long ms) */
FUNC(__hc_msleep)
	retl
	 nop
ENDFUNC(__hc_msleep)

/* void __hc_schedule(void) */
FUNC(__hc_schedule)
	retl
	 nop
ENDFUNC(__hc_schedule)

/* void __hc_do_exit(long code) -- never returns */
FUNC(__hc_do_exit)
	retl
	 nop
ENDFUNC(__hc_do_exit)

/* unsigned long __hc_ktime_get_ns(void) */
FUNC(__hc_ktime_get_ns)
	retl
	 nop
ENDFUNC(__hc_ktime_get_ns)

/*
 * Return address of every task's top frame: the task's function returned.
 * Tasks are entered with %o7 = __hc_task_return - 8, so that their
 * "restore; retl" lands here.
 */
FUNC(__hc_task_return)
	retl
	 nop
ENDFUNC(__hc_task_return)

/* Return address of calls the machine makes into the guest (nested calls). */
FUNC(__hc_call_return)
	retl
	 nop
ENDFUNC(__hc_call_return)

	.globl __hypercall_end
__hypercall_end:

/*
 * Idle loop for CPUs with nothing to run: an annulled branch to itself, so
 * there is no delay slot to stop in.
 */
FUNC(cpu_idle)
1:	ba,a	1b
	 nop
ENDFUNC(cpu_idle)

/*
 * A jprobe handler ends with a call here; the probe core traps on the
 * breakpoint, restores the registers (all register windows included) and
 * stack saved at the probe hit and resumes the probed function.  The
 * return is not normally reached.
 */
FUNC(jprobe_return)
	ta	0x70
	retl
	 nop
ENDFUNC(jprobe_return)

/*
 * kretprobes redirect return addresses here (%i7 = kretprobe_trampoline - 8
 * in the probed function's window).  The probe core traps on the
 * breakpoint, runs the return handlers and resumes at the real return
 * address.
 */
FUNC(kretprobe_trampoline)
	ta	0x70
	nop
ENDFUNC(kretprobe_trampoline)

	.section .note.GNU-stack, "", @progbits
