"""Hydra configs of fqtrun (a package so Hydra finds them in an installed fqtrun too)."""
