"""OpenSora 1.2 as upstream runs it: the pipeline and its components, weights, memory, video files. Imports
nothing of the study above it (``utils.imports``)."""
