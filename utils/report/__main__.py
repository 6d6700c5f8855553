"""``python -m utils.report``: render the report from the stored records (``utils.report.render``)."""
import sys

from utils.report.render import main

sys.exit(main())
