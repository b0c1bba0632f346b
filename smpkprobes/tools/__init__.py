"""The tooling: the command line, the scenario harness, stress and shrinking, mutants, the
invariant checker, benchmarks and trace export.  Built on the public Machine."""
