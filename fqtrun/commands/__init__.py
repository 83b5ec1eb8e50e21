"""One module per `fqtrun <command>`: a thin @hydra.main wrapper around an importable run()."""
