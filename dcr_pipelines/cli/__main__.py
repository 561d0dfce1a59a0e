"""`python -m dcr_pipelines.cli`."""

from . import main

main()
