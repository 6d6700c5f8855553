"""The report, rendered from stored records alone (``python -m utils.report``): the renderer, figure helpers,
number formats and one section module per notebook. Never imports an experiment."""
