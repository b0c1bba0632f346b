// SPDX-License-Identifier: MIT
/*
 * printk(): format into a buffer on the caller's stack and hand the bytes to
 * the machine's console hypercall.  The buffer is per call (not static)
 * because several emulated CPUs may be inside printk() at once.  Output
 * longer than PRINTK_BUF_SIZE - 1 bytes is truncated.
 */
#include "kernel.h"

__kapi int printk(const char *fmt, ...)
{
	char buf[PRINTK_BUF_SIZE];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);

	if (n < 0)
		n = 0;
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	__hc_console_write(buf, (unsigned long)n);
	return n;
}
