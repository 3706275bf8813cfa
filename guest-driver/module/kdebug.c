// SPDX-License-Identifier: GPL-2.0
/*
 * Dynamic-debug sites for the Rust driver. Linux 7.3's Rust pr_debug!() is compiled out
 * without CONFIG_RUST_DEBUG_ASSERTIONS and has no dynamic-debug descriptor, so the kiocb
 * state-transition log goes through these two C sites instead:
 *
 *   echo 'module aiodma +p' > /proc/dynamic_debug/control
 *
 * (or `aiodma.dyndbg=+p` on the kernel command line; /init forwards it to insmod).
 */
#include <linux/dynamic_debug.h>
#include <linux/printk.h>
#include <linux/types.h>

bool aiodma_kdebug_enabled(void);
void aiodma_kdebug(const void *args);

/* Whether the kiocb log is on: lets the Rust side skip formatting when it is off. */
bool aiodma_kdebug_enabled(void)
{
	DEFINE_DYNAMIC_DEBUG_METADATA(site, "aiodma: kiocb state transitions enabled\n");

	/*
	 * Without jump labels the branch is a plain load of site.flags, and the site's address
	 * escapes nowhere else: clang then folds the function to "return 0" and drops the site
	 * from __dyndbg, so dyndbg could never switch the log on. Make the address escape.
	 */
	barrier_data(&site);

	return DYNAMIC_DEBUG_BRANCH(site);
}

/*
 * One kiocb state transition: @args points at the Rust side's core::fmt::Arguments, which
 * printk formats itself (%pA), so nothing is allocated; the callers hold a spinlock.
 */
void aiodma_kdebug(const void *args)
{
	DEFINE_DYNAMIC_DEBUG_METADATA(site, "aiodma: %pA");

	if (DYNAMIC_DEBUG_BRANCH(site))
		__dynamic_pr_debug(&site, "aiodma: %pA", args);
}
