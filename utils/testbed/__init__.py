"""The quality testbed: synthetic clips with stated attributes, the adherence detector, the mini model trained
here and its training, the fidelity metrics' noise floor."""
