"""The optimisation ladder: named ``apply_<name>`` steps over a built pipeline (``registry``), each tested
against the fp32 baseline."""
