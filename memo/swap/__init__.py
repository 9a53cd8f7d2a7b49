"""memo.swap: the host pool and the engine that moves token slices between device and host."""
