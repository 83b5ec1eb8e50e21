"""Procedures that assemble models from a config (fqtrun.build) and run them: a training run, the
precision range test, the gradient-variance study, the documented experiments. Commands call these;
the technique packages below (precision, sparsity, analysis, intbn) never import them."""
