"""Who am I and who else is there: environment, process groups, RNG, signals, threads, model wrapping."""
