"""Denoising spread over several processes and machines with ``torch.distributed`` (gloo, CPUs), launched by
``torchrun``: CFG parallel, sequence parallel (VideoSys's dynamic sequence parallelism for STDiT3) and batch
parallel (``utils.parallel.modes``), over the ranks and counted collectives of ``utils.parallel.world``."""
