"""Training: the compiled train step, engines for distributed runs, and the training CLIs."""
