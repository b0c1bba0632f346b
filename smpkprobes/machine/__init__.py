"""The simulated SMP machine: one shared physical memory, Unicorn CPUs run as trio tasks by a
seeded conductor, guest tasks, text patching with cross-CPU syncs, grace periods, modules,
hypercalls, oopses and the kernel images.  It knows nothing of kprobes."""
