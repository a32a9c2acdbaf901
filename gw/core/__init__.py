"""The pure core: exposures, configuration, the rendered ruleset and the errors. No I/O."""
