"""What each notebook runs and the records it stores: one module per notebook (``eNN_<name>``), plus the
fresh-process variant runs notebooks 04 and 06 share, the GPU comparison and the aarch64 check."""
