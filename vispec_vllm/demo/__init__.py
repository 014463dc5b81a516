"""The embedded demo (tooling: the plugin never imports this package): synthetic scenes, the
scene target trained from scratch, the build of the shipped pair, and the server runner the demo,
tests and benchmarks use."""
