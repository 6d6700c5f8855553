"""The OpenSora 1.2 CPU inference study. Sub-packages, lowest layer first: model, optim and measure, testbed,
experiments and report (see README "How the code is organised" and ``utils.imports``)."""
