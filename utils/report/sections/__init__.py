"""One module per notebook's part of the report, each with ``NOTEBOOKS``, ``FIGURES`` and ``section(inputs)``
(``utils.report.render`` lists them in ``SECTIONS``)."""
