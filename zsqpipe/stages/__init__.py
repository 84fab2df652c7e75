"""One module per pipeline stage; each exposes one pure function (typed arguments in, files out)."""
