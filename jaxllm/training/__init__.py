"""The generic training machinery every stage reuses: losses, optimizer, jitted step, loop,
checkpoints and metrics."""
