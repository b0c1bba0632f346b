// SPDX-License-Identifier: MIT
/*
 * example_mod: a loadable "module" linked at fixed addresses against the
 * kernel's symbol table (ld --just-symbols=vmlinux).  Its init function sits
 * in .init.text (0x480000) so tests can check that probes on init code are
 * removed when the module's init section is freed.
 */
#include "kernel.h"

__kapi __section(".init.text") int example_mod_init(void)
{
	printk("example_mod: init\n");
	return 0;
}

__kapi long example_mod_func(long x)
{
	barrier();
	return x + 1;
}
