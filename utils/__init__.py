"""OpenSora 1.2 text-to-video inference on CPU: a faithful re-implementation plus the study's tooling."""
